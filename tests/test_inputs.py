"""Inputs that used to be taken without a word: a defect mask of another size than its image, a
margin that cannot be met on the unit sphere, a score weight outside [0, 1]."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from raml.cache import read_cache
from raml.errors import UserError
from raml.extract.pyramid import BadImageError, load_mask
from raml.pipeline import cli
from raml.train.config import TrainConfig, make_config
from raml.train.loss import _normal_spread
from raml.train.original_loss import _elementwise_std
from tests.conftest import TINY_MODEL
from tests.synthetic import make_mvtec, mask_image
from tests.test_extract import run

# --- 1. a defect mask of another size than its image ----------------------------------------------

SIZE_ADVICE = "a mask must have its image's size (another image's mask, or an export at another resolution?)"


@pytest.fixture
def wrong_mask(tmp_path):
    """A bottle dataset (5 images of 97 x 83 px) whose second defect mask is a 150 x 75 px export."""
    root = make_mvtec(tmp_path / "data", categories=("bottle",), n_train=2, n_test_good=1, defects=("broken",))
    mask = root / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    mask_image((150, 75)).save(mask)
    return root, root / "bottle" / "test" / "broken" / "001.png", mask


def test_a_mask_of_another_size_stops_extract_naming_both_files_and_sizes(wrong_mask, tiny_backbone, tmp_path):
    root, image, mask = wrong_mask
    with pytest.raises(BadImageError) as refused:
        run(root, tmp_path / "cache", tiny_backbone, patch_tokens=True)
    assert str(refused.value) == (
        f"{image}: its defect mask {mask} is 150x75 px but the image is 97x83 px: {SIZE_ADVICE} "
        "(pass --skip-bad to skip such files and list them in the cache's report)"
    )


def test_skip_bad_skips_the_image_of_a_mask_of_another_size_and_lists_it(wrong_mask, tiny_backbone, tmp_path):
    root, image, mask = wrong_mask
    cache_dir = tmp_path / "cache"
    summary = run(root, cache_dir, tiny_backbone, patch_tokens=True, skip_bad=True)
    reason = f"its defect mask {mask} is 150x75 px but the image is 97x83 px: {SIZE_ADVICE}"
    assert summary.images == 4 and summary.skipped == [(str(image), reason)]
    table = read_cache(cache_dir)
    assert "bottle/test/broken/001.png" not in table.relpath.tolist() and len(table) == 4
    assert table.skipped == [("bottle/test/broken/001.png", reason)]
    report = json.loads((cache_dir / "extract-report-000of001.json").read_text())
    assert report["skipped"] == [{"path": str(image), "reason": reason}]


def test_the_command_line_says_it_in_one_line(wrong_mask, tmp_path):
    root, image, mask = wrong_mask
    result = CliRunner().invoke(
        cli,
        ["extract", "--dataset", "mvtec", "--root", str(root), "--cache-dir", str(tmp_path / "cache"),
         "--model", TINY_MODEL, "--random-weights", "--workers", "0", "--patch-tokens"],
    )  # fmt: skip
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert f"Error: {image}: its defect mask {mask} is 150x75 px but the image is 97x83 px" in result.output


def test_one_pixel_off_is_refused_and_an_exif_rotated_mask_is_compared_upright(tmp_path):
    short = tmp_path / "short_mask.png"
    mask_image((97, 82)).save(short)
    with pytest.raises(BadImageError, match=r"short_mask.png: defect mask is 97x82 px but the image is 97x83 px"):
        load_mask(short, 97, 83)
    rotated = tmp_path / "rotated_mask.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored 83 wide and 97 high, shown turned a quarter clockwise: 97 x 83
    Image.fromarray(np.rot90(np.asarray(mask_image((97, 83)))).copy()).save(rotated, exif=exif)
    upright = load_mask(rotated, 97, 83)
    np.testing.assert_array_equal(upright, np.asarray(mask_image((97, 83))) > 0)


def test_the_winclip_baseline_refuses_it_too(wrong_mask):
    from raml.evaluate.baselines.winclip_run import scoring_masks

    root, image, mask = wrong_mask
    record = SimpleNamespace(label=1, relpath="bottle/test/broken/001.png", mask_relpath=str(mask.relative_to(root)))
    with pytest.raises(BadImageError, match=rf"^{image}: its defect mask {mask} is 150x75 px but the image is 97x83"):
        scoring_masks(root, [record], np.array([[83, 97]]))


# --- 2. margins the unit sphere cannot hold -------------------------------------------------------


def test_sigma_bounds_are_what_the_losses_can_reach():
    """σ ≤ √2 for this project's spread (reached by two opposite normals), ≤ 1 for the original's."""
    opposite = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    _, sigma, _ = _normal_spread(opposite, torch.ones(2))
    assert float(sigma) == pytest.approx(math.sqrt(2), abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    for n, dim in ((2, 2), (3, 2), (5, 128), (64, 8)):
        features = torch.nn.functional.normalize(torch.randn(200, n, dim, generator=generator), dim=-1)
        spreads = torch.stack([_normal_spread(f, torch.ones(n))[1] for f in features])
        assert float(spreads.max()) <= math.sqrt(2) + 1e-6
        original = torch.stack([_elementwise_std(f, torch.ones(n)) for f in features])
        assert float(original.max()) <= 1 + 1e-6
    assert make_config().sigma_bound() == math.sqrt(2)
    assert make_config(loss_variant="original", pixel_head="off").sigma_bound() == 1.0
    assert make_config(loss_variant="original").sigma_bound() == math.sqrt(2)  # the pixel loss's σ is ours


def test_a_margin_beyond_the_sphere_is_refused_naming_the_options_and_the_largest_margin():
    with pytest.raises(UserError) as refused:
        make_config("adaptive", margin_base=5)
    assert str(refused.value) == (
        "invalid training configuration: --margin-base 5 --lambda-sigma 0.3 --lambda-res 0.3 can reach a margin of "
        "5.724 (m_base + λ_σ·σ + λ_res·(1 − r/r_max), with σ ≤ 1.414 and 1 − r/r_max < 1), but the MACCL features "
        "are L2-normalised: no anomalous image is ever more than 2 from the center, so a larger margin is never met "
        "and stops mattering. Keep m_base + 1.414·λ_σ + λ_res ≤ 2 (with these λ: --margin-base ≤ 1.276)"
    )


@pytest.mark.parametrize(
    "margin, overrides, accepted",
    [
        ("adaptive", {}, True),  # 0.5 + 0.3·√2 + 0.3 = 1.224
        ("strong", {}, True),  # 1.0
        ("adaptive", {"margin_base": 1.2757}, True),  # 1.2757 + 0.4243 + 0.3 = 1.99996
        ("adaptive", {"margin_base": 1.2758}, False),  # 2.00006
        ("strong", {"margin_base": 2.0}, True),  # exactly 2: met by opposite features
        ("strong", {"margin_base": 2.001}, False),
        ("fixed", {"lambda_res": 1.5}, True),  # 0.5 + 1.5·(1 − r/r_max) < 2
        ("fixed", {"lambda_res": 1.5, "margin_base": 0.51}, False),  # 0.51 + 1.5 = 2.01
        ("adaptive", {"loss_variant": "original", "pixel_head": "off", "margin_base": 1.4}, True),  # 1.4 + 0.3 + 0.3
        ("adaptive", {"loss_variant": "raml", "pixel_head": "off", "margin_base": 1.4}, False),  # 1.4 + 0.424 + 0.3
    ],
)
def test_the_bound_is_m_base_plus_lambda_sigma_times_the_sigma_bound_plus_lambda_res(margin, overrides, accepted):
    if accepted:
        make_config(margin, **overrides)
    else:
        with pytest.raises(UserError, match="can reach a margin of"):
            make_config(margin, **overrides)


def test_large_lambdas_are_told_to_come_down():
    with pytest.raises(
        UserError, match=r"Keep m_base \+ 1.414·λ_σ \+ λ_res ≤ 2 \(lower --lambda-sigma or --lambda-res\)$"
    ):
        make_config("adaptive", lambda_sigma=2.0)


def test_train_sweep_and_raml_toml_refuse_it_before_any_work(mvtec_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = CliRunner().invoke(
        cli, ["train", "--cache-dir", str(mvtec_cache), "--out", str(tmp_path / "run"), "--margin-base", "5"]
    )
    assert train.exit_code == 1 and train.output.count("Error:") == 1
    assert "Error: invalid training configuration: --margin-base 5 --lambda-sigma 0.3" in train.output
    assert not (tmp_path / "run").exists() and "train:" not in train.output  # refused before reading the cache

    sweep = CliRunner().invoke(
        cli, ["sweep", "--cache-dir", str(mvtec_cache), "--out", str(tmp_path / "sweep"), "--vary", "margin_base=0.5,5"]
    )
    assert sweep.exit_code == 2 and "Invalid value for '--vary': --margin-base 5 " in sweep.output
    assert not (tmp_path / "sweep").exists()

    (tmp_path / "raml.toml").write_text("[train]\nmargin_base = 5\n")
    monkeypatch.setenv("RAML_CONFIG", str(tmp_path / "raml.toml"))
    from_file = CliRunner().invoke(cli, ["train", "--cache-dir", str(mvtec_cache), "--out", str(tmp_path / "run")])
    assert (
        from_file.exit_code == 1 and "--margin-base 5 --lambda-sigma 0.3 --lambda-res 0.3 can reach" in from_file.output
    )


# --- 3. score weights outside [0, 1] --------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("text_weight", 2.0), ("visual_weight", 1.5), ("text_weight", -0.1)])
def test_a_score_weight_outside_zero_one_is_refused(name, value):
    with pytest.raises(UserError, match=rf"{name} {value!r} must be ≥ 0 and ≤ 1"):
        TrainConfig(**{name: value})


def test_score_weights_at_the_ends_are_a_convex_combination():
    config = TrainConfig(visual_weight=1.0, text_weight=0.0)  # the ablation "visual-score-only"
    assert (config.visual_weight, config.text_weight) == (1.0, 0.0)
