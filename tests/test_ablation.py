"""The head's ablation switches: each removes what it names, and nothing else changes."""

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from raml.cache import read_cache
from raml.cache.synthetic import write_synthetic_cache
from raml.train.checkpoint import load_checkpoint
from raml.train.config import TrainConfig, make_config
from raml.train.fit import fit, write_run
from raml.train.model import RAMLHead, build_head

DIMS = dict(hidden_dim=16, attn_dim=8, feature_dim=8)
CROSS_SCALE = ("keys.", "queries.", "arrow_norms.")
TEXT = ("text_query.", "text_key.", "fusion_scale", "text_norm.")


def _head(**switches) -> RAMLHead:
    torch.manual_seed(0)
    return RAMLHead(32, **DIMS, **switches).eval()


def _inputs(batch=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 21, 32, generator=generator),
        torch.randn(3, 2, 32, generator=generator),
        torch.tensor([0, 1, 2, 0][:batch]),
    )


def _outputs(head, crops, text_bank, category):
    with torch.no_grad():
        return head(crops, text_bank, category)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _names(head) -> list[str]:
    return [name for name, _ in head.named_parameters()]


def test_default_head_has_the_parameters_of_checkpoints_written_before_the_switches():
    names = set(build_head(TrainConfig(), 32).state_dict())
    expected = {
        f"{part}.{i}.{leaf}"
        for i in range(3)
        for part, leaves in (
            ("project", ("weight", "bias")),
            ("keys", ("weight",)),
            ("queries", ("weight",)),
            ("arrow_norms", ("weight", "bias")),
        )
        for leaf in leaves
    }
    expected |= {
        "fuse.0.weight",
        "fuse.0.bias",
        "fuse.2.weight",
        "fuse.2.bias",
        "fuse.3.weight",
        "fuse.3.bias",
        "text_query.weight",
        "text_key.weight",
        "fusion_scale",
        "text_norm.weight",
        "text_norm.bias",
        "feature_head.0.weight",
        "feature_head.0.bias",
        "feature_head.2.weight",
        "feature_head.2.bias",
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.2.weight",
        "classifier.2.bias",
    }
    assert names == expected
    assert build_head(TrainConfig(), 32).fuse[0].in_features == 3 * 256


def test_build_head_reads_every_switch_of_the_config():
    head = build_head(make_config(scales="1,2", cross_attention=False, text_fusion=False, **DIMS), 32)
    assert (head.n_scales, head.cross_attention, head.text_fusion, head.tile_pool) == (2, False, False, "max")
    assert build_head(TrainConfig(tile_pool="mean").to_dict(), 32).tile_pool == "mean"


# --- cross-attention ------------------------------------------------------------------------------


def _permute_within_scales(crops, seed=2):
    """The 4 quadrants shuffled among themselves, and the 16 tiles among themselves."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.tensor([0]), 1 + torch.randperm(4, generator=generator), 5 + torch.randperm(16, generator=generator)]
    )
    return crops[:, order]


def test_cross_attention_off_has_no_attention_parameters():
    names = _names(_head(cross_attention=False))
    assert not [name for name in names if name.startswith(CROSS_SCALE)]
    assert [name for name in _names(_head()) if name.startswith(CROSS_SCALE)]  # the method has them


def test_cross_attention_off_ignores_where_the_tiles_are():
    """Without attention the quadrants and tiles are only pooled: permuting them within their
    scale changes nothing (up to the order of the mean's float sums). With attention (each
    quadrant attends over its own children) it does."""
    crops, text_bank, category = _inputs()
    permuted = _permute_within_scales(crops)
    off = _head(cross_attention=False)
    for before, after in zip(_outputs(off, crops, text_bank, category), _outputs(off, permuted, text_bank, category)):
        assert torch.allclose(before, after, atol=1e-6)
    on = _head()
    change = _outputs(on, crops, text_bank, category)[1] - _outputs(on, permuted, text_bank, category)[1]
    assert change.abs().max() > 1e-3


def test_cross_attention_off_is_projection_then_pooling():
    head = _head(cross_attention=False)
    crops = _inputs()[0]
    project = head.project
    expected = torch.cat(
        [project[0](crops[:, 0]), project[1](crops[:, 1:5]).mean(1), project[2](crops[:, 5:21]).amax(1)], dim=1
    )
    with torch.no_grad():
        assert torch.allclose(head.scale_summaries(crops), expected, atol=1e-6)


# --- scales ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_scales, first_unread", [(1, 1), (2, 5)])
def test_fewer_scales_never_read_the_other_crops(n_scales, first_unread):
    head = _head(n_scales=n_scales, cross_attention=n_scales > 1)
    crops, text_bank, category = _inputs()
    changed = crops.clone()
    changed[:, first_unread:] = torch.randn_like(changed[:, first_unread:])
    assert _same(_outputs(head, crops, text_bank, category), _outputs(head, changed, text_bank, category))
    read = crops.clone()
    read[:, first_unread - 1] += 1.0  # the finest crop it does read matters
    assert not torch.allclose(
        _outputs(head, crops, text_bank, category)[1], _outputs(head, read, text_bank, category)[1]
    )


def test_all_scales_read_the_fine_tiles():
    head = _head()
    crops, text_bank, category = _inputs()
    changed = crops.clone()
    changed[:, 5:] = torch.randn_like(changed[:, 5:])
    assert not torch.allclose(
        _outputs(head, crops, text_bank, category)[1], _outputs(head, changed, text_bank, category)[1]
    )


@pytest.mark.parametrize("n_scales, cross_attention", [(1, False), (2, True), (2, False)])
def test_fewer_scales_have_no_parameters_for_the_others(n_scales, cross_attention):
    head = _head(n_scales=n_scales, cross_attention=cross_attention)
    per_scale = {name.split(".")[1] for name in _names(head) if name.startswith(("project.", *CROSS_SCALE))}
    assert per_scale == {str(i) for i in range(n_scales)}
    assert head.fuse[0].in_features == n_scales * DIMS["hidden_dim"]


def test_two_scale_arrows_each_attend_over_more_than_one_key():
    head = _head(n_scales=2)
    f1, f2 = torch.randn(2, 1, 16), torch.randn(2, 4, 16)
    arrows = head.arrow_attention(f1, f2)
    assert [keys.shape[1] for _, keys, _, _ in arrows] == [4, 5]  # f1 → F2, F2 → [f1; F2]
    assert [mask is None for *_, mask in arrows] == [True, True]


# --- text fusion ----------------------------------------------------------------------------------


def test_text_fusion_off_has_no_text_parameters_and_ignores_the_text_bank():
    off = _head(text_fusion=False)
    assert not [name for name in _names(off) if name.startswith(TEXT)]
    crops, text_bank, category = _inputs()
    other_bank, other_category = torch.randn_like(text_bank), torch.tensor([2, 2, 1, 1])
    assert _same(_outputs(off, crops, text_bank, category), _outputs(off, crops, other_bank, other_category))
    on = _head()
    assert not torch.allclose(_outputs(on, crops, text_bank, category)[1], _outputs(on, crops, other_bank, category)[1])


# --- tile pooling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_pool, expected", [("max", [15.0, 30.0, 0.0, 7.5]), ("mean", [7.5, 15.0, 0.0, 7.5])])
def test_tile_pool_on_a_hand_made_input(tile_pool, expected):
    """Identity projections, no attention: the fusion's tile block is the max or the mean of the
    16 tiles. Tile t (t = 0..15) is (t, 2t, 0, 7.5): max (15, 30, 0, 7.5), mean (7.5, 15, 0, 7.5)."""
    head = RAMLHead(4, hidden_dim=4, attn_dim=2, feature_dim=2, cross_attention=False, tile_pool=tile_pool)
    with torch.no_grad():
        for project in head.project:
            project.weight.copy_(torch.eye(4))
            project.bias.zero_()
    crops = torch.zeros(1, 21, 4)
    tiles = torch.arange(16.0)
    crops[0, 5:] = torch.stack([tiles, 2 * tiles, torch.zeros(16), torch.full((16,), 7.5)], dim=1)
    with torch.no_grad():
        summaries = head.scale_summaries(crops)
    assert summaries[0, 8:].tolist() == expected
    assert summaries[0, :8].tolist() == [0.0] * 8  # the global crop and the quadrants are zeros


# --- refused combinations, training, vmap --------------------------------------------------------------


@pytest.mark.parametrize(
    "switches, message",
    [
        (dict(n_scales=1), "--cross-attention off"),
        (dict(n_scales=2, tile_pool="mean"), "--scales 1,2 leaves out"),
        (dict(tile_pool="median"), "median"),
    ],
)
def test_switches_that_cannot_act_are_refused(switches, message):
    with pytest.raises(ValueError, match=message):
        RAMLHead(32, **DIMS, **switches)


SWITCHES = [
    dict(),
    dict(n_scales=1, cross_attention=False),
    dict(n_scales=2),
    dict(cross_attention=False),
    dict(text_fusion=False),
    dict(tile_pool="mean"),
]


@pytest.mark.parametrize("switches", SWITCHES)
def test_every_variant_runs_under_vmap_over_stacked_heads(switches):
    """What batched training does: three heads' weights stacked, one vmapped forward and backward."""
    heads = []
    for seed in range(3):
        torch.manual_seed(seed)
        heads.append(RAMLHead(32, **DIMS, **switches))
    params, buffers = stack_module_state(heads)
    crops, text_bank, category = _inputs()

    def run(p, b):
        return functional_call(heads[0], (p, b), (crops, text_bank, category))

    features, logits = vmap(run)(params, buffers)
    for i, head in enumerate(heads):
        alone = head(crops, text_bank, category)
        assert torch.allclose(features[i], alone[0], atol=1e-5) and torch.allclose(logits[i], alone[1], atol=1e-5)
    (features.sum() + logits.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())


def test_an_ablated_head_trains_and_round_trips_through_its_checkpoint(tmp_path):
    table = read_cache(write_synthetic_cache(tmp_path / "cache", {"bottle": (24, 8, 8, 900)}, dim=32, separation=3.0))
    config = make_config(scales="1", cross_attention=False, text_fusion=False, epochs=1, **DIMS)
    trained = fit(table, config)
    write_run(tmp_path / "run", trained)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.config["scales"] == "1" and checkpoint.model.n_scales == 1
    assert not checkpoint.model.text_fusion
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, checkpoint.model.state_dict()[name])
