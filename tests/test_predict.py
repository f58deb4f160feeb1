"""predict: a folder with a corrupt file still scores the others; the backbone and the threshold come from the
checkpoint."""

import csv
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from raml.cache import read_cache
from raml.extract.identity import file_sha256
from raml.pipeline import cli
from raml.train.checkpoint import load_checkpoint
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from tests.synthetic import make_mvtec

TINY = "extract/model_configs/raml-tiny-test.json"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mvtec_cache):
    out = tmp_path_factory.mktemp("run") / "raml"
    write_run(out, fit(read_cache(mvtec_cache), make_config("adaptive", epochs=2, batch_size=8)))
    return out


def test_predict_folder_with_one_corrupt_file(tmp_path, run_dir, mvtec_root):
    folder = tmp_path / "parts"
    folder.mkdir()
    shutil.copy(mvtec_root / "bottle" / "test" / "good" / "000.png", folder / "good.png")
    shutil.copy(mvtec_root / "bottle" / "test" / "broken" / "000.png", folder / "broken.png")
    (folder / "corrupt.png").write_bytes((mvtec_root / "bottle" / "test" / "good" / "001.png").read_bytes()[:120])
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    out = tmp_path / "predictions"
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            str(folder),
            "--checkpoint",
            str(run_dir),
            "--category",
            "bottle",
            "--out",
            str(out),
            "--model",
            TINY,
            "--random-weights",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(str(folder / "corrupt.png") in line and "ERROR" in line and "cannot decode" in line for line in lines)
    for name in ("good.png", "broken.png"):
        line = next(line for line in lines if line.startswith(str(folder / name)))
        assert "normal" in line or "ANOMALOUS" in line
    assert "1 of 3 files could not be scored" in result.output
    assert "NOT MEANINGFUL" in result.output
    with open(out / "predictions.csv", newline="") as handle:
        rows = {row["file"].split("/")[-1]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"good.png", "broken.png", "corrupt.png"}
    assert rows["corrupt.png"]["final"] == "" and "cannot decode" in rows["corrupt.png"]["error"]
    assert 0.0 <= float(rows["good.png"]["final"]) <= 1.0 and rows["good.png"]["decision"] in ("normal", "anomalous")
    assert rows["good.png"]["map"].endswith("good_map.npy") and 0.0 <= float(rows["good.png"]["map_max"]) <= 1.0
    anomaly_map = np.load(out / "good_map.npy")  # at the image's resolution: 97 x 83 px
    assert anomaly_map.shape == (83, 97) and anomaly_map.dtype == np.float32
    assert 0.0 <= anomaly_map.min() and anomaly_map.max() <= float(rows["good.png"]["map_max"]) + 1e-6
    with Image.open(out / "broken_overlay.png") as overlay:
        assert overlay.size == (97, 83) and overlay.mode == "RGB"
    assert not (out / "corrupt_map.npy").exists() and not (out / "corrupt_overlay.png").exists()
    assert "zero-shot text" in result.output  # the run was trained without patch tokens: no pixel head


def test_predict_refuses_a_backbone_other_than_the_checkpoints(tmp_path, run_dir, mvtec_root):
    image = str(mvtec_root / "bottle" / "test" / "good" / "000.png")
    for options, differ in (
        (["--model", "ViT-B-16"], "--model"),
        (["--pretrained", "openai"], "--pretrained"),
        (["--weights", image], "--weights"),
    ):
        result = CliRunner().invoke(
            cli,
            ["predict", image, "--checkpoint", str(run_dir), "--category", "bottle", "--out", str(tmp_path), *options],
        )
        assert result.exit_code == 2  # a usage error: the options contradict the checkpoint
        assert "trained on features of --model raml-tiny-test --random-weights" in result.output
        assert f"the options given differ in {differ}." in result.output and "Traceback" not in result.output


def test_predict_takes_the_backbone_from_the_checkpoint(tmp_path, run_dir, mvtec_root):
    """No backbone option: the checkpoint's (tiny config, random weights) is loaded, and the decision
    uses the category's own threshold."""
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            str(mvtec_root / "bottle" / "test" / "good" / "000.png"),
            "--checkpoint",
            str(run_dir),
            "--category",
            "bottle",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--no-heatmaps",
        ],
    )
    assert result.exit_code == 0, result.output
    threshold = load_checkpoint(run_dir).thresholds["categories"]["bottle"]["threshold"]
    assert f"decision (threshold {threshold:.3f}: bottle's own, F1-max on its training images)" in result.output
    assert "NOT MEANINGFUL" in result.output
    with open(tmp_path / "predictions.csv", newline="") as handle:
        assert float(next(csv.DictReader(handle))["threshold"]) == pytest.approx(threshold, abs=1e-6)


def test_a_category_the_run_was_not_trained_on_gets_the_pooled_threshold(tmp_path, run_dir, mvtec_root):
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            str(mvtec_root / "bottle" / "test" / "good" / "000.png"),
            "--checkpoint",
            str(run_dir),
            "--category",
            "screw",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--no-heatmaps",
        ],
    )
    assert result.exit_code == 0, result.output
    pooled = load_checkpoint(run_dir).thresholds["pooled"]["threshold"]
    assert f"screw: the pooled threshold {pooled:.4f} applies: the run was not trained on 'screw'" in result.output
    assert f"decision (threshold {pooled:.3f}: pooled, as the run was not trained on 'screw')" in result.output
    strict = CliRunner().invoke(
        cli,
        [
            "predict",
            str(mvtec_root / "bottle" / "test" / "good" / "000.png"),
            "--checkpoint",
            str(run_dir),
            "--category",
            "screw",
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
            "--no-heatmaps",
            "--strict",
        ],
    )
    assert strict.exit_code == 1 and not (tmp_path / "s").exists()
    assert (
        f"Error: --strict: {run_dir} has no decision threshold of its own for 'screw' (the run was not trained "
        f"on 'screw'); without --strict the pooled threshold {pooled:.4f} applies"
    ) in strict.output


def test_a_weights_file_is_found_at_its_recorded_path_and_named_when_it_has_moved(tmp_path, tiny_backbone):
    """extract with --weights FILE records the file; predict finds it there, and once it has moved
    says which file (name and sha256) to pass."""
    weights = tmp_path / "tiny-weights.pt"
    torch.save(tiny_backbone.model.state_dict(), weights)
    root = make_mvtec(tmp_path / "data", categories=("bottle",), n_train=8, n_test_good=4, n_defect=2)
    cache, run = tmp_path / "cache", tmp_path / "run"
    extracted = CliRunner().invoke(
        cli,
        [
            "extract",
            "--dataset",
            "mvtec",
            "--root",
            str(root),
            "--cache-dir",
            str(cache),
            "--model",
            TINY,
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    assert extracted.exit_code == 0, extracted.output
    write_run(run, fit(read_cache(cache), make_config("adaptive", epochs=1, batch_size=8)))
    image = str(root / "bottle" / "test" / "good" / "000.png")
    predict = ["predict", image, "--checkpoint", str(run), "--category", "bottle", "--device", "cpu", "--no-heatmaps"]
    found = CliRunner().invoke(cli, [*predict, "--out", str(tmp_path / "p1")])
    assert found.exit_code == 0, found.output
    moved = weights.rename(tmp_path / "elsewhere.pt")
    lost = CliRunner().invoke(cli, [*predict, "--out", str(tmp_path / "p2")])
    assert lost.exit_code == 1 and "Traceback" not in lost.output
    sha256 = file_sha256(moved)
    assert f"the file tiny-weights.pt with sha256 {sha256}; it was at {weights}" in lost.output
    assert "Pass --weights PATH" in lost.output
    given = CliRunner().invoke(cli, [*predict, "--out", str(tmp_path / "p3"), "--weights", str(moved)])
    assert given.exit_code == 0, given.output
    with (
        open(tmp_path / "p1" / "predictions.csv", newline="") as a,
        open(tmp_path / "p3" / "predictions.csv", newline="") as b,
    ):
        assert next(csv.DictReader(a))["final"] == next(csv.DictReader(b))["final"]
