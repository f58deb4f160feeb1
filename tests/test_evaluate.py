"""evaluate: protocols, results files, and the same held-out images for the model and the baseline."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from raml.cache import read_cache
from raml.errors import UserError
from raml.evaluate.baselines.winclip_run import run_winclip
from raml.evaluate.protocols import select_images
from raml.evaluate.report import write_report
from raml.evaluate.run import config_name, evaluate_checkpoints, find_checkpoints, group_configurations
from raml.extract.config import ExtractConfig
from raml.extract.run import extract_features
from raml.pipeline import cli
from raml.train.checkpoint import load_checkpoint
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from raml.train.split import image_list_hash
from tests.synthetic import make_visa

FAST = dict(epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mvtec_cache):
    """A small sweep directory: adaptive seeds 0 and 1, fixed seed 0 (2 epochs each)."""
    table = read_cache(mvtec_cache)
    out = tmp_path_factory.mktemp("runs")
    for margin, seed in (("adaptive", 0), ("adaptive", 1), ("fixed", 0)):
        write_run(out / f"{margin}-seed{seed}", fit(table, make_config(margin, seed=seed, **FAST)))
    return out


@pytest.fixture(scope="module")
def visa_cache(tmp_path_factory, tiny_backbone):
    root = make_visa(tmp_path_factory.mktemp("visa"))
    cache_dir = tmp_path_factory.mktemp("cache") / "visa"
    extract_features("visa", root, cache_dir, lambda: tiny_backbone, ExtractConfig(workers=0), progress=False)
    return cache_dir


@pytest.fixture(scope="module")
def holdout_results(tmp_path_factory, runs, mvtec_cache):
    out = tmp_path_factory.mktemp("results") / "mvtec"
    return evaluate_checkpoints([runs], mvtec_cache, out, n_resamples=50, log=lambda *_: None)


def _scored_relpaths(results_dir, config, seed):
    with open(results_dir / "scores.csv", newline="") as handle:
        return sorted(r["relpath"] for r in csv.DictReader(handle) if r["config"] == config and r["seed"] == str(seed))


def test_runs_of_a_sweep_group_into_configurations(runs):
    paths = find_checkpoints([runs])
    assert [config_name(p) for p in paths] == ["adaptive", "adaptive", "fixed"]


def test_holdout_scores_exactly_the_held_out_images(holdout_results, runs):
    path, entries = holdout_results
    manifest = load_checkpoint(runs / "adaptive-seed0").manifest
    assert set(manifest["heldout"]).isdisjoint(manifest["train"])
    entry = entries["adaptive"]
    assert entry["protocol"]["name"] == "holdout"
    assert entry["protocol"]["image_list_hash"] == manifest["heldout_hash"] == image_list_hash(manifest["heldout"])
    for seed in (0, 1):
        assert _scored_relpaths(path.parent, "adaptive", seed) == sorted(manifest["heldout"])
    assert entry["seeds"] == [0, 1] and entry["margin"] == "adaptive"


def test_results_keep_the_original_schema_with_the_extra_fields(holdout_results):
    path, _ = holdout_results
    data = json.loads(path.read_text())
    assert set(data) == {"adaptive", "fixed"}
    entry = data["adaptive"]
    assert set(entry["details"]) == {"bottle", "metal_nut"}
    assert entry["mean_auroc"] == pytest.approx(np.mean(list(entry["details"].values())), abs=0.01)
    stats = entry["categories"]["bottle"]
    assert stats["auroc_ci95"][0] <= stats["auroc"] <= stats["auroc_ci95"][1]
    assert len(stats["auroc_per_seed"]) == 2 and len(stats["f1_max_threshold"]) == 2
    assert entry["random_weights"] is True and "NOT MEANINGFUL" in entry["warning"]
    assert entry["backbone"] == "raml-tiny-test"
    assert "pixel" not in entry and "anomaly_maps" not in entry  # no patch tokens, no pixel head: no maps
    assert not (path.parent / "anomaly_maps.npz").exists()
    with open(path.parent / "scores.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert {"visual", "text", "final"} <= set(row)


def test_baseline_is_scored_on_the_same_held_out_images(tmp_path, runs, mvtec_root, tiny_backbone, holdout_results):
    path, entries = run_winclip(
        "mvtec",
        mvtec_root,
        tmp_path / "winclip",
        lambda: tiny_backbone,
        split_from=runs / "adaptive-seed0",
        workers=0,
        n_resamples=20,
        progress=False,
    )
    winclip = entries["WinCLIP zero-shot"]
    raml = holdout_results[1]["adaptive"]
    assert winclip["protocol"]["name"] == "holdout"
    assert winclip["protocol"]["image_list_hash"] == raml["protocol"]["image_list_hash"]
    assert _scored_relpaths(path.parent, "WinCLIP zero-shot", "") == _scored_relpaths(
        holdout_results[0].parent, "adaptive", 0
    )
    text = write_report([holdout_results[0], path], tmp_path / "report").read_text()
    assert "| category | adaptive † | fixed † | WinCLIP zero-shot † |" in text


def test_transfer_is_the_default_on_another_dataset(tmp_path, runs, visa_cache):
    path, entries = evaluate_checkpoints(
        [runs / "adaptive-seed0"], visa_cache, tmp_path / "visa", n_resamples=20, log=lambda *_: None
    )
    entry = entries["adaptive"]
    table = read_cache(visa_cache, with_features=False)
    assert entry["protocol"]["name"] == "transfer"
    assert entry["protocol"]["n_images"] == int((table.split == "test").sum())
    assert set(entry["details"]) == {"candle", "pcb1"}


def test_protocols_refuse_the_wrong_cache(runs, mvtec_cache, visa_cache):
    checkpoint = load_checkpoint(runs / "adaptive-seed0")
    with pytest.raises(ValueError, match="not the dataset the model was trained on"):
        select_images("holdout", checkpoint.manifest, "run", read_cache(visa_cache, with_features=False))
    with pytest.raises(ValueError, match="includes the training images"):
        select_images("official", checkpoint.manifest, "run", read_cache(mvtec_cache, with_features=False))


def test_evaluate_command_prints_a_summary_marked_not_meaningful(tmp_path, runs, mvtec_cache):
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(runs / "fixed-seed0"),
            "--cache-dir",
            str(mvtec_cache),
            "--out",
            str(tmp_path / "out"),
            "--bootstrap",
            "20",
            "--name",
            "fixed m=0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fixed m=0.5: image AUROC" in result.output and "holdout protocol" in result.output
    assert "NOT MEANINGFUL" in result.output
    assert "fixed m=0.5" in json.loads((tmp_path / "out" / "results.json").read_text())


def test_evaluate_command_names_a_missing_checkpoint(tmp_path, mvtec_cache):
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "nothing"),
            "--cache-dir",
            str(mvtec_cache),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and "Invalid value for '--checkpoint'" in result.output
    assert "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "empty"),
            "--cache-dir",
            str(mvtec_cache),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty'}: no checkpoint.pt" in result.output


# --- which runs are seeds of one configuration ---------------------------------------------------


@pytest.fixture(scope="module")
def mismatched_runs(tmp_path_factory, mvtec_cache):
    """x-seed0 is a strong run, x-seed1 a fixed run with lr 1e-2: one name, two configurations."""
    table = read_cache(mvtec_cache)
    out = tmp_path_factory.mktemp("mismatched")
    write_run(out / "x-seed0", fit(table, make_config("strong", seed=0, **FAST)))
    write_run(out / "x-seed1", fit(table, make_config("fixed", seed=1, lr=1e-2, **FAST)))
    return out


def test_runs_of_one_name_trained_differently_are_refused(tmp_path, mismatched_runs, mvtec_cache):
    with pytest.raises(UserError) as err:
        evaluate_checkpoints([mismatched_runs], mvtec_cache, tmp_path / "out", n_resamples=10, log=lambda *_: None)
    message = str(err.value)
    assert "'x'" in message and "not seeds of one configuration" in message
    assert "lr: 5e-05 vs 0.01; margin: 'strong' vs 'fixed'; margin_base: 1.0 vs 0.5" in message
    assert not (tmp_path / "out").exists()


def test_name_cannot_pool_different_configurations(runs):
    with pytest.raises(UserError, match="margin: 'adaptive' vs 'fixed'"):
        group_configurations(find_checkpoints([runs]), name="everything")


def test_the_same_seed_twice_is_not_two_seeds(runs):
    paths = find_checkpoints([runs / "adaptive-seed0", runs / "adaptive-seed0" / "checkpoint.pt"])
    with pytest.raises(UserError, match="two runs with seed 0"):
        group_configurations(paths)


def test_a_configuration_records_its_training_settings(holdout_results):
    entry = holdout_results[1]["adaptive"]
    assert entry["config"]["margin"] == "adaptive" and entry["config"]["epochs"] == 2
    assert "seed" not in entry["config"]


def test_evaluate_carries_the_last_epochs_fraction_inside_the_margin(tmp_path, runs, mvtec_cache):
    import shutil

    for seed, fraction in ((0, 0.5), (1, 1.0)):
        run = tmp_path / f"adaptive-seed{seed}"
        shutil.copytree(runs / f"adaptive-seed{seed}", run)
        history = json.loads((run / "history.json").read_text())
        history[0]["anomalous_inside_margin"] = 0.0
        history[-1]["anomalous_inside_margin"] = fraction
        (run / "history.json").write_text(json.dumps(history))
    _, entries = evaluate_checkpoints([tmp_path], mvtec_cache, tmp_path / "out", n_resamples=10, log=lambda *_: None)
    assert entries["adaptive"]["anomalous_inside_margin"] == 0.75
    assert entries["adaptive"]["anomalous_inside_margin_over_seeds"] == {
        "mean": 0.75,
        "std": pytest.approx(0.5 / np.sqrt(2)),
        "n": 2,
    }


# --- same dataset or not: from the fingerprint and the training list ------------------------------


def test_a_run_that_held_out_nothing_is_not_a_transfer_to_its_own_cache(runs, mvtec_cache):
    """An older run whose split held out nothing: its cache is still its training dataset."""
    table = read_cache(mvtec_cache, with_features=False)
    manifest = {"train": sorted(table.relpath.tolist()), "heldout": []}
    with pytest.raises(UserError, match="held out no images"):
        select_images(None, manifest, "run", table)
    with pytest.raises(UserError, match="includes the training images"):
        select_images("transfer", manifest, "run", table)


def test_a_cache_holding_the_training_images_but_not_the_held_out_ones_is_still_the_training_dataset(runs, mvtec_cache):
    checkpoint = load_checkpoint(runs / "adaptive-seed0")
    table = read_cache(mvtec_cache, with_features=False)
    part = table.select(np.isin(table.relpath, checkpoint.manifest["train"]))  # e.g. extracted with --limit
    with pytest.raises(UserError, match="not in this cache"):
        select_images(None, checkpoint.manifest, "run", part)


def test_the_fingerprints_dataset_alone_identifies_the_training_dataset(runs, mvtec_cache):
    checkpoint = load_checkpoint(runs / "adaptive-seed0")
    table = read_cache(mvtec_cache, with_features=False)
    others = table.select(~np.isin(table.relpath, checkpoint.manifest["train"]))  # no training image here
    assert checkpoint.fingerprint["dataset"] == table.meta["dataset"]
    with pytest.raises(UserError, match="was trained on"):
        select_images(
            "official", checkpoint.manifest, "run", others, training_dataset=checkpoint.fingerprint["dataset"]
        )
    rows, image_list = select_images("official", checkpoint.manifest, "run", others)  # without it: another dataset
    assert image_list.protocol == "official"


def test_results_say_how_the_checkpoint_thresholds_do_on_the_held_out_images(holdout_results, runs):
    from raml.train.thresholds import operating_point, threshold_for

    path, entries = holdout_results
    with open(path.parent / "scores.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["config"] == "adaptive" and r["category"] == "bottle"]
    points = []
    for seed in (0, 1):
        mine = [r for r in rows if r["seed"] == str(seed)]
        threshold = threshold_for(load_checkpoint(runs / f"adaptive-seed{seed}"), "bottle")
        points.append(
            operating_point(
                np.array([int(r["label"]) for r in mine]), np.array([float(r["final"]) for r in mine]), threshold
            )
        )
    recorded = entries["adaptive"]["checkpoint_thresholds"]["bottle"]
    assert recorded["recall"]["n"] == 2
    assert recorded["recall"]["mean"] == pytest.approx(100 * np.mean([p["recall"] for p in points]), abs=0.01)


def test_a_baseline_split_from_a_run_that_held_out_nothing_is_refused(tmp_path, mvtec_root, tiny_backbone):
    (tmp_path / "run").mkdir()
    from raml.train.split import image_list_hash

    train = ["bottle/train/good/000.png"]
    (tmp_path / "run" / "split.json").write_text(
        json.dumps(
            {"train": train, "heldout": [], "train_hash": image_list_hash(train), "heldout_hash": image_list_hash([])}
        )
    )
    with pytest.raises(UserError, match="held out no images"):
        run_winclip(
            "mvtec",
            mvtec_root,
            tmp_path / "winclip",
            lambda: tiny_backbone,
            split_from=tmp_path / "run",
            workers=0,
            n_resamples=10,
            progress=False,
        )
