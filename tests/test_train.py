"""Stage two: head, split, training, checkpoints, scoring and the train CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raml.cache import read_cache
from raml.cache.synthetic import write_synthetic_cache
from raml.errors import CacheError, UserError
from raml.evaluate.metrics import image_auroc
from raml.pipeline import cli
from raml.train.checkpoint import check_cache, load_checkpoint
from raml.train.config import TrainConfig, make_config
from raml.train.fit import fit, write_run
from raml.train.infer import score_rows, score_table, text_score
from raml.train.model import RAMLHead, attend
from raml.train.split import heldout_counts, holdout_split, image_list_hash, rows_for
from raml.train.thresholds import calibrate_thresholds

SEPARABLE = {"bottle": (60, 20, 20, 900), "metal_nut": (60, 20, 20, 700)}
QUICK = dict(epochs=6, lr=1e-3, hidden_dim=64, attn_dim=16, feature_dim=32)  # a larger lr: seconds, not minutes


@pytest.fixture(scope="module")
def separable_table(tmp_path_factory):
    """Two categories, D=32, defects strong enough to separate: a head must learn them."""
    return read_cache(
        write_synthetic_cache(tmp_path_factory.mktemp("sep") / "cache", SEPARABLE, dim=32, separation=3.0)
    )


@pytest.fixture(scope="module")
def trained(separable_table):
    return fit(separable_table, make_config("adaptive", **QUICK))


# --- model -----------------------------------------------------------------------------------


def _arrow_weights(arrows):
    return [
        (q @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + (0 if mask is None else mask)).softmax(-1)
        for q, k, _, mask in arrows
    ]


def test_no_attention_arrow_is_a_softmax_over_a_single_key():
    torch.manual_seed(0)
    head = RAMLHead(32, hidden_dim=16, attn_dim=8)
    f1, f2, f3 = torch.randn(2, 1, 16), torch.randn(2, 4, 16), torch.randn(2, 16, 16)
    for weights in _arrow_weights(head.arrow_attention(f1, f2, f3)):
        keys_per_query = (weights > 0).sum(-1)
        assert keys_per_query.min() >= 2
        assert weights.max() < 1.0


@pytest.mark.parametrize("arrow, attended", [(0, "f2"), (1, "f3"), (2, "f1")])
def test_each_arrow_depends_on_the_tokens_it_attends_to(arrow, attended):
    """f1' ← F2, f2' ← F3, f3' ← f1: changing the attended tokens changes both the attention
    weights (so the arrow is not a fixed copy) and the arrow's output."""
    torch.manual_seed(0)
    head = RAMLHead(32, hidden_dim=16, attn_dim=8)
    tokens = {"f1": torch.randn(2, 1, 16), "f2": torch.randn(2, 4, 16), "f3": torch.randn(2, 16, 16)}
    changed = dict(tokens, **{attended: tokens[attended] + torch.randn_like(tokens[attended])})
    before, after = (head.arrow_attention(t["f1"], t["f2"], t["f3"])[arrow] for t in (tokens, changed))
    assert not torch.allclose(_arrow_weights([before])[0], _arrow_weights([after])[0])
    out_before, out_after = (head.cross_scale(t["f1"], t["f2"], t["f3"])[arrow] for t in (tokens, changed))
    assert not torch.allclose(out_before, out_after)


def test_quadrants_attend_to_their_own_children_only():
    head = RAMLHead(32, hidden_dim=16, attn_dim=8)
    allowed = torch.isfinite(head.quadrant_children)
    assert allowed.sum(1).tolist() == [4, 4, 4, 4]
    assert allowed[0].nonzero()[:, 0].tolist() == [0, 1, 4, 5]  # top-left quadrant: tiles (0,0) (0,1) (1,0) (1,1)
    assert allowed[3].nonzero()[:, 0].tolist() == [10, 11, 14, 15]


def test_head_outputs_unit_features_and_a_logit():
    head = RAMLHead(32, hidden_dim=16, attn_dim=8, feature_dim=8)
    features, logits = head(torch.randn(5, 21, 32), torch.randn(3, 2, 32), torch.tensor([0, 1, 2, 2, 0]))
    assert features.shape == (5, 8) and logits.shape == (5,)
    assert torch.allclose(features.norm(dim=1), torch.ones(5))
    assert head.fusion_scale.item() == pytest.approx(0.1)


def test_attend_weights_values():
    q, k = torch.zeros(1, 1, 4), torch.randn(1, 3, 4)
    values = torch.tensor([[[1.0], [2.0], [6.0]]])
    assert attend(q, k, values).item() == pytest.approx(3.0)  # equal scores → the mean


# --- split ------------------------------------------------------------------------------------


def test_heldout_counts_rule():
    assert heldout_counts([12, 30], 0.2) == [3, 6]  # MVTec toothbrush (docs/method.md#the-holdout-split)
    assert heldout_counts([2, 2], 0.2) == [1, 1]  # at least one of each class with ≥ 2 images
    assert heldout_counts([1, 5], 0.2) == [0, 2]  # a single image stays in training
    assert heldout_counts([0, 0], 0.2) == [0, 0]


def test_holdout_split_is_disjoint_stratified_and_deterministic(separable_table):
    table = separable_table
    split = holdout_split(table, seed=0)
    assert not set(split.train) & set(split.heldout)
    assert sorted([*split.train, *split.heldout]) == list(range(len(table)))
    assert set(np.flatnonzero(table.split == "train")) <= set(split.train)
    for category in table.categories:
        held = split.heldout[table.category[split.heldout] == category]
        assert [(table.label[held] == label).sum() for label in (0, 1)] == [4, 4]  # 20 % of 20 and 20
    again, other = holdout_split(table, seed=0), holdout_split(table, seed=1)
    assert np.array_equal(split.heldout, again.heldout) and split.manifest() == again.manifest()
    assert not np.array_equal(split.heldout, other.heldout)


def test_manifest_hashes_are_stable(separable_table):
    manifest = holdout_split(separable_table, seed=0).manifest()
    assert manifest["protocol"] == "holdout" and manifest["fraction"] == 0.2 and manifest["seed"] == 0
    assert manifest["heldout_hash"] == image_list_hash(manifest["heldout"])
    assert manifest["heldout_hash"] == image_list_hash(reversed(manifest["heldout"]))  # order-free
    # sha256 of the sorted, newline-joined relpaths
    assert image_list_hash(["b.png", "a.png"]) == "1baca9d47fd86b4a995bb3508dea720d384b601ee539a4961303e841d4b856ac"
    assert rows_for(separable_table, manifest["heldout"]).tolist() == holdout_split(separable_table).heldout.tolist()


def test_a_split_that_holds_out_nothing_is_refused(tmp_path):
    """3 categories × (3 train, 1 good, 1 defect): every image would train and none be held out."""
    shape = {name: (3, 1, 1, 900) for name in ("bottle", "cable", "screw")}
    table = read_cache(write_synthetic_cache(tmp_path / "cache", shape, dim=8))
    with pytest.raises(UserError, match="would hold out no image") as err:
        holdout_split(table)
    assert "bottle: 1 normal, 1 anomalous" in str(err.value)
    assert "at least 2 normal and 2 anomalous test images" in str(err.value)


def test_train_refuses_a_cache_too_small_to_hold_anything_out(tmp_path):
    shape = {name: (3, 1, 1, 900) for name in ("bottle", "cable", "screw")}
    cache = write_synthetic_cache(tmp_path / "cache", shape, dim=8)
    result = CliRunner().invoke(
        cli, ["train", "--cache-dir", str(cache), "--out", str(tmp_path / "run"), "--batch-size", "4", "--epochs", "1"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "would hold out no image" in result.output and "at least 2 normal and 2 anomalous" in result.output
    assert not (tmp_path / "run").exists()


def test_rows_for_names_missing_images(separable_table):
    with pytest.raises(CacheError, match="nope/missing.png"):
        rows_for(separable_table, [separable_table.relpath[0], "nope/missing.png"])


# --- training ---------------------------------------------------------------------------------


def test_separable_classes_train_to_high_heldout_auroc(separable_table, trained):
    heldout = trained.split.heldout
    scores = score_rows(trained.model, separable_table, heldout)
    assert image_auroc(separable_table.label[heldout], scores["visual"]) > 0.95
    assert image_auroc(separable_table.label[heldout], scores["final"]) > 0.95
    assert len(trained.history) == QUICK["epochs"]
    assert {"loss", "center", "margin", "contrastive", "bce", "sigma", "mean_margin"} <= set(trained.history[0])


@pytest.fixture(scope="module")
def default_table(tmp_path_factory):
    """A small separable cache of ViT-B/16's width (D = 512): 2 categories × (16 train, 20 good,
    20 defective) → 96 training images (6 steps of 16 per epoch) and 16 held-out images."""
    shape = {"bottle": (16, 20, 20, 900), "metal_nut": (16, 20, 20, 700)}
    return read_cache(
        write_synthetic_cache(tmp_path_factory.mktemp("default") / "cache", shape, dim=512, separation=2.0)
    )


def test_the_default_hyper_parameters_learn_a_separable_problem(default_table):
    """lr 5e-5, batch 16, 25 epochs and every other default: held-out AUROC ≥ 0.9. The untrained
    head (the same run stopped after one epoch) is far from it, so this is learning, not the data."""
    config = TrainConfig()
    assert (config.lr, config.batch_size, config.epochs) == (5e-5, 16, 25)
    trained = fit(default_table, config)
    heldout = trained.split.heldout
    labels = default_table.label[heldout]
    assert image_auroc(labels, score_rows(trained.model, default_table, heldout)["final"]) >= 0.9
    barely = fit(default_table, TrainConfig(epochs=1))
    assert image_auroc(labels, score_rows(barely.model, default_table, heldout)["final"]) < 0.8


def test_thresholds_are_calibrated_per_category_by_hand():
    labels = [0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.5, 0.6, 0.7, 0.65, 0.9, 0.95]
    categories = ["a"] * 4 + ["b"] * 6
    calibration = calibrate_thresholds(labels, scores, categories)
    # a: at 0.35 flags 0.35, 0.4, 0.8 → P 2/3, R 1, F1 0.8 (the F1-max; see test_metrics)
    assert calibration["categories"]["a"] == {
        "threshold": 0.35,
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "normal": 2,
        "anomalous": 2,
    }
    # b: at 0.65 flags 0.7, 0.65, 0.9, 0.95 → P 3/4, R 1, F1 6/7; at 0.9: P 1, R 2/3, F1 0.8
    assert calibration["categories"]["b"]["threshold"] == 0.65
    assert calibration["categories"]["b"]["precision"] == 0.75 and calibration["categories"]["b"]["recall"] == 1.0
    # pooled over all ten: at 0.65 flags 0.95 0.9 0.8 0.7 0.65 → P 4/5, R 4/5, F1 0.8 (0.8: F1 0.75; 0.35: 0.71)
    assert calibration["pooled"] == {
        "threshold": 0.65,
        "precision": 0.8,
        "recall": 0.8,
        "f1": pytest.approx(0.8),
        "normal": 5,
        "anomalous": 5,
    }
    assert "training images" in calibration["set"]


def test_a_category_with_one_class_has_no_threshold_of_its_own():
    calibration = calibrate_thresholds([0, 1, 0, 0], [0.2, 0.9, 0.3, 0.4], ["a", "a", "b", "b"])
    assert calibration["categories"]["b"]["threshold"] is None
    assert "only normal calibration images" in calibration["categories"]["b"]["reason"]
    assert calibration["pooled"]["threshold"] == 0.9


def test_a_format_1_checkpoint_with_one_threshold_still_loads(tmp_path, trained):
    from raml.train.thresholds import threshold_for, threshold_note

    path = write_run(tmp_path / "run", trained)
    payload = torch.load(path, weights_only=True)
    payload["format"] = 1
    payload["threshold"] = 0.42
    del payload["thresholds"]
    torch.save(payload, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.thresholds["pooled"]["threshold"] == 0.42 and checkpoint.thresholds["categories"] == {}
    assert threshold_for(checkpoint, "bottle") == 0.42
    assert "this checkpoint has one threshold" in threshold_note(checkpoint, "bottle")


def test_training_is_deterministic(separable_table, trained):
    config = make_config("adaptive", **QUICK)
    again = fit(separable_table, config).model.state_dict()
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, again[name]), name
    other = fit(separable_table, make_config("adaptive", **{**QUICK, "seed": 1, "epochs": 1})).model.state_dict()
    assert not torch.equal(other["project.0.weight"], again["project.0.weight"])


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="batch_size"):
        make_config("adaptive", batch_size=1)
    with pytest.raises(ValueError, match="r_max"):
        make_config("adaptive", r_max="huge")
    with pytest.raises(ValueError, match="margin .medium. is not one of"):
        make_config("medium")


# --- checkpoint and scoring ---------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, separable_table, trained):
    write_run(tmp_path / "run", trained)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "checkpoint.pt",
        "config.json",
        "split.json",
        "history.json",
    }
    checkpoint = load_checkpoint(tmp_path / "run")
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, checkpoint.model.state_dict()[name])
    assert checkpoint.config == trained.config.to_dict() == json.loads((tmp_path / "run/config.json").read_text())
    assert checkpoint.manifest == trained.split.manifest() == json.loads((tmp_path / "run/split.json").read_text())
    assert torch.equal(checkpoint.loss_state["center"], trained.loss_state["center"])
    assert float(checkpoint.loss_state["sigma"]) == float(trained.loss_state["sigma"])
    assert checkpoint.categories == ["bottle", "metal_nut"]
    assert checkpoint.fingerprint["embed_dim"] == 32 and checkpoint.thresholds == trained.thresholds
    assert set(checkpoint.thresholds["categories"]) == {"bottle", "metal_nut"}
    assert not checkpoint.model.training
    scores = score_table(checkpoint, separable_table)
    direct = score_rows(trained.model, separable_table)
    for kind in ("visual", "text", "final"):
        assert np.array_equal(scores[kind], direct[kind])
        assert scores[kind].min() >= 0 and scores[kind].max() <= 1


def test_checkpoint_of_vit_b16_size_is_a_few_megabytes(tmp_path):
    from raml.train.checkpoint import save_checkpoint
    from raml.train.model import build_head

    path = save_checkpoint(
        tmp_path,
        model=build_head(TrainConfig(), 512),
        config=TrainConfig().to_dict(),
        loss_state={},
        manifest={},
        fingerprint={"embed_dim": 512},
        categories=[],
        thresholds={"pooled": {"threshold": 0.5}, "categories": {}},
    )
    assert path.stat().st_size < 6e6


def test_checkpoint_refuses_a_cache_of_another_backbone(tmp_path, trained):
    write_run(tmp_path / "run", trained)
    other = read_cache(
        write_synthetic_cache(tmp_path / "other", {"bottle": (4, 2, 2, 900)}, dim=32, backbone="ViT-L-14")
    )
    with pytest.raises(CacheError, match="backbone"):
        check_cache(load_checkpoint(tmp_path / "run"), other)
    with pytest.raises(CacheError, match="backbone"):
        score_table(load_checkpoint(tmp_path / "run"), other)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(CacheError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)


def test_text_score_is_the_difference_of_cosines_through_clips_logit_scale():
    normal, anomalous = np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])
    text = {"widget": {"normal": normal, "anomalous": anomalous}}
    t_anomalous = np.array([0.0, 1.6, 0.8]) / np.linalg.norm([0.0, 1.6, 0.8])  # mean prompt, re-normalised
    g = np.array([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    expected = [1 / (1 + np.exp(-100 * (row @ t_anomalous - row @ normal[0]))) for row in g]
    assert text_score(g, text, ["widget", "widget"]) == pytest.approx(expected)


# --- CLI on a cache made by extract (tiny random-weights CLIP) ---------------------------------------


def test_train_cli_on_an_extracted_cache(tmp_path, mvtec_cache):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--cache-dir",
            str(mvtec_cache),
            "--margin",
            "fixed",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--hidden-dim",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and "σ" in result.output
    checkpoint = load_checkpoint(out)
    assert checkpoint.config["margin"] == "fixed" and checkpoint.config["margin_base"] == 0.5
    assert checkpoint.config["lambda_sigma"] == 0.0 and checkpoint.config["epochs"] == 2
    assert checkpoint.fingerprint["random_weights"] is True
    again = CliRunner().invoke(cli, ["train", "--cache-dir", str(mvtec_cache), "--out", str(out)])
    assert again.exit_code != 0 and "already holds" in again.output


def test_train_cli_rejects_bad_options_plainly(tmp_path, mvtec_cache):
    result = CliRunner().invoke(
        cli, ["train", "--cache-dir", str(mvtec_cache), "--out", str(tmp_path / "r"), "--r-max", "big"]
    )
    assert (
        result.exit_code == 2
        and "Invalid value for '--r-max': 'big': expected image, category or a positive number of pixels"
        in result.output
    )
    assert "Traceback" not in result.output


def test_user_errors_are_one_line_and_bugs_keep_their_traceback_in_a_log(tmp_path, monkeypatch):
    not_a_cache = tmp_path / "empty"
    not_a_cache.mkdir()
    user_error = CliRunner().invoke(cli, ["info", "--cache-dir", str(not_a_cache)])
    assert user_error.exit_code == 1 and isinstance(user_error.exception, SystemExit)
    assert user_error.output.startswith("Error: ") and "is not a RAML feature cache" in user_error.output
    assert user_error.output.count("\n") == 1

    def bug(*args, **kwargs):
        raise ValueError("an internal mistake")  # a plain ValueError is a bug, not the user's error

    monkeypatch.setattr("raml.cache.read_cache", bug)
    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))
    crashed = CliRunner().invoke(cli, ["info", "--cache-dir", str(not_a_cache)])
    assert (
        crashed.exit_code == 1 and "Error: unexpected ValueError in `cli info`: an internal mistake." in crashed.output
    )
    (log,) = (tmp_path / "user-cache" / "logs").glob("error-*.log")
    assert 'raise ValueError("an internal mistake")' in log.read_text()  # the traceback, kept
    monkeypatch.setenv("RAML_DEBUG", "1")
    debugged = CliRunner().invoke(cli, ["info", "--cache-dir", str(not_a_cache)])
    assert isinstance(debugged.exception, ValueError) and "Error: " not in debugged.output
