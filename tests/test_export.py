"""export: a deployment directory whose standalone script, run without torch, reproduces predict's scores and
anomaly maps."""

import csv
import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raml.cache import CROP_LAYOUT, read_cache
from raml.cache.tokens import map_at, token_grid
from raml.evaluate.deploy.export import (
    DEPLOY_JSON,
    ENCODER_FILE,
    HEAD_FILE,
    SCRIPT_FILE,
    SCRIPT_TEMPLATE,
    export_deployment,
)
from raml.extract.onnx_engine import OnnxEngineError
from raml.extract.pyramid import MIN_IMAGE_SIDE, BadImageError, load_rgb, pyramid_pixels
from raml.pipeline import cli
from raml.train.checkpoint import load_checkpoint
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from tests.conftest import TINY_MODEL
from tests.synthetic import part_image

BACKBONE = ["--model", TINY_MODEL, "--random-weights", "--device", "cpu"]
SCORE_TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-5  # export's map within 1e-5 of predict's
# Runs the script in a child in which importing torch, open_clip or a RAML package fails.
WITHOUT_TORCH = """
import runpy, sys
BLOCKED = {"torch", "open_clip", "raml", "cache", "extract", "train", "evaluate", "pipeline"}
assert not BLOCKED & set(sys.modules), "imported before the script ran"
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: a deployment must not need it")
sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mvtec_token_cache):
    """A run with a pixel head (trained on a cache with patch tokens)."""
    out = tmp_path_factory.mktemp("run") / "raml"
    trained = fit(read_cache(mvtec_token_cache), make_config("adaptive", epochs=2, batch_size=8))
    assert trained.pixel_head.startswith("on")
    write_run(out, trained)
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, run_dir, user_cache_dir):
    out = tmp_path_factory.mktemp("deploy") / "deploy"
    # no backbone options: the checkpoint's own (the tiny config, random weights) is loaded
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def parts(tmp_path_factory, mvtec_root):
    """Images of several sizes and modes, one of them corrupt."""
    folder = tmp_path_factory.mktemp("parts")
    for name, kind in (("good", "good"), ("broken", "broken")):
        (folder / f"{name}.png").write_bytes((mvtec_root / "bottle" / "test" / kind / "000.png").read_bytes())
    part_image(7, (131, 67), anomalous=True).convert("RGBA").save(folder / "wide rgba.png")
    sixteen_bit = np.asarray(part_image(8, (80, 96)).convert("L"), np.uint16) * 250 + 100
    Image.fromarray(sixteen_bit.astype(np.uint16)).save(folder / "grey16.png")
    (folder / "corrupt.png").write_bytes((folder / "good.png").read_bytes()[:120])
    return sorted(folder.iterdir())


def predict_scores(files, run_dir, out, engine):
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            *map(str, files),
            "--checkpoint",
            str(run_dir),
            "--category",
            "bottle",
            "--out",
            str(out),
            "--engine",
            engine,
            *BACKBONE,
        ],
    )
    assert "trained pixel head" in result.output
    assert result.exit_code == 1 and "1 of 5 files could not be scored" in result.output, result.output
    with open(out / "predictions.csv", newline="") as handle:
        return {
            row["file"]: (float(row["final"]), row["decision"].upper())
            for row in csv.DictReader(handle)
            if not row["error"]
        }


def script_scores(deploy_dir, files, cwd):
    """Run deploy/predict_onnx.py in a child that cannot import torch; {file: (score, DECISION)}."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_TORCH,
            str(deploy_dir / SCRIPT_FILE),
            *map(str, files),
            "--category",
            "bottle",
            "--maps",
            str(cwd / "maps"),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 1, child.stderr  # the corrupt file
    assert "NOT MEANINGFUL" in child.stdout and "RANDOM WEIGHTS" in child.stderr
    scores, errors = {}, []
    for line in child.stdout.splitlines()[1:-1]:
        name, score, decision = line.rsplit(maxsplit=2) if "ERROR" not in line else (line, None, None)
        if score is None:
            errors.append(line)
        else:
            scores[name] = (float(score), decision)
    return scores, errors


def test_export_writes_a_self_contained_deployment(deployment, run_dir, tiny_backbone):
    deploy_dir, output = deployment
    deploy = json.loads((deploy_dir / DEPLOY_JSON).read_text())
    checkpoint = load_checkpoint(run_dir)
    assert deploy["categories"] == checkpoint.categories == ["bottle", "metal_nut"]
    calibrated = checkpoint.thresholds["categories"]
    assert deploy["thresholds"] == {c: pytest.approx(calibrated[c]["threshold"]) for c in checkpoint.categories}
    assert calibrated["bottle"]["threshold"] != calibrated["metal_nut"]["threshold"]  # one per category
    assert deploy["threshold_calibration"]["bottle"] == calibrated["bottle"]
    assert {"precision", "recall"} <= set(deploy["threshold_calibration"]["metal_nut"])
    assert "training images" in deploy["threshold_is"]
    assert deploy["score_weights"] == {"visual": 0.85, "text": 0.15}
    assert (deploy["input_size"], deploy["crop_layout"]) == (tiny_backbone.input_size, [list(g) for g in CROP_LAYOUT])
    assert (deploy["mean"], deploy["std"]) == (list(tiny_backbone.mean), list(tiny_backbone.std))
    assert (deploy["backbone"], deploy["weights"]) == ("raml-tiny-test", "random(seed=0)")
    assert deploy["random_weights"] is True and "meaningless" in deploy["warning"]
    assert "RANDOM WEIGHTS" in output
    for part, name in (("encoder", ENCODER_FILE), ("head", HEAD_FILE)):
        assert deploy[part]["file"] == name and deploy[part]["bytes"] == (deploy_dir / name).stat().st_size
        assert deploy[part]["max_abs_diff_vs_torch"] <= SCORE_TOLERANCE
    assert deploy["map"]["kind"].startswith("RAML's trained pixel head")
    assert (deploy["map"]["token_crops"], deploy["map"]["tiles"], deploy["map"]["per_tile"]) == ([5, 21], 4, 2)
    assert (deploy_dir / SCRIPT_FILE).read_bytes() == SCRIPT_TEMPLATE.read_bytes()


def test_standalone_script_without_torch_reproduces_predict(deployment, run_dir, parts, tmp_path):
    torch_scores = predict_scores(parts, run_dir, tmp_path / "torch", "torch")
    onnx_scores = predict_scores(parts, run_dir, tmp_path / "onnx", "onnx")
    standalone, errors = script_scores(deployment[0], parts, tmp_path)
    assert len(errors) == 1 and "corrupt.png" in errors[0]
    assert set(standalone) == set(torch_scores) == set(onnx_scores) and len(standalone) == 4
    threshold = load_checkpoint(run_dir).thresholds["categories"]["bottle"]["threshold"]
    for name, (score, decision) in torch_scores.items():
        assert abs(onnx_scores[name][0] - score) <= SCORE_TOLERANCE, name
        assert abs(standalone[name][0] - score) <= SCORE_TOLERANCE, name
        if abs(score - threshold) > SCORE_TOLERANCE:
            assert standalone[name][1].upper() == decision, name
    for path in parts:
        if path.name != "corrupt.png":
            theirs = np.load(tmp_path / "maps" / f"{path.stem}_map.npy")
            for engine in ("torch", "onnx"):
                ours = np.load(tmp_path / engine / f"{path.stem}_map.npy")
                assert ours.shape == theirs.shape == load_rgb(path).size[::-1], path.name
                assert np.abs(ours - theirs).max() <= MAP_TOLERANCE, (path.name, engine)


def test_standalone_pyramid_equals_the_package_pyramid(tmp_path, tiny_backbone):
    spec = importlib.util.spec_from_file_location("predict_onnx_template", SCRIPT_TEMPLATE)
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)
    images = {
        "odd.png": part_image(1, (97, 83)),
        "rgba.png": part_image(2, (130, 65)).convert("RGBA"),
        "palette.png": part_image(3, (70, 90)).convert("P"),
        "grey.jpg": part_image(4, (64, 64)).convert("L"),
        "grey16.png": Image.fromarray((np.arange(100 * 75, dtype=np.uint16) * 8).reshape(75, 100)),
    }
    size, mean, std = tiny_backbone.input_size, tiny_backbone.mean, tiny_backbone.std
    for name, image in images.items():
        image.save(tmp_path / name)
        ours = pyramid_pixels(load_rgb(tmp_path / name), size, mean, std)
        theirs = template.pyramid_pixels(
            template.load_rgb(tmp_path / name, MIN_IMAGE_SIDE), size, mean, std, CROP_LAYOUT
        )
        assert theirs.dtype == np.float32 and np.array_equal(ours, theirs), name
    scores = np.random.default_rng(0).random(4 * 4 * 3 * 3)
    for height, width in ((83, 97), (64, 64), (1023, 700)):  # the restated map: cache.tokens.map_at's values
        ours = map_at(token_grid(scores, 3), height, width)
        assert np.array_equal(template.anomaly_map(scores, height, width, 4, 3), ours), (height, width)
    part_image(5, (MIN_IMAGE_SIDE - 1, 100)).save(tmp_path / "narrow.png")
    with pytest.raises(BadImageError, match="too small"):
        load_rgb(tmp_path / "narrow.png")
    with pytest.raises(ValueError, match="too small"):
        template.load_rgb(tmp_path / "narrow.png", MIN_IMAGE_SIDE)


def test_export_refuses_a_backbone_other_than_the_checkpoints(run_dir, tmp_path, tiny_backbone):
    out = tmp_path / "deploy"
    result = CliRunner().invoke(
        cli,
        [
            "export",
            "--checkpoint",
            str(run_dir),
            "--out",
            str(out),
            "--model",
            TINY_MODEL,
            "--pretrained",
            "openai",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2  # a usage error: the options contradict the checkpoint
    assert "trained on features of --model raml-tiny-test --random-weights" in result.output
    assert "differ in --pretrained" in result.output
    other_weights = dataclasses.replace(tiny_backbone, weights="sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="weights: checkpoint 'random\\(seed=0\\)', given 'sha256:0000"):
        export_deployment(load_checkpoint(run_dir), out, other_weights)
    assert not out.exists()


def test_head_graph_that_does_not_match_torch_leaves_the_deployment_unchanged(
    deployment, run_dir, tiny_backbone, user_cache_dir, monkeypatch
):
    deploy_dir = deployment[0]
    before = {path.name: path.read_bytes() for path in deploy_dir.iterdir()}
    monkeypatch.setattr("raml.evaluate.deploy.export.PARITY_TOLERANCE", 0.0)  # float32 rounding alone now fails
    with pytest.raises(OnnxEngineError, match="does not match the torch head.*Nothing in .* was changed"):
        export_deployment(load_checkpoint(run_dir), deploy_dir, tiny_backbone, onnx_cache_root=user_cache_dir / "onnx")
    assert {path.name: path.read_bytes() for path in deploy_dir.iterdir()} == before
