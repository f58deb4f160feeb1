"""calibrate: thresholds from good images at a chosen false-alarm rate (the rule on hand-made score
lists, its guarantee by simulation), written into deploy.json and used by predict_onnx.py and predict."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from raml.evaluate.deploy.calibrate import (
    CALIBRATION_KEY,
    NotEnoughImagesError,
    conformal_threshold,
    minimum_images,
)
from raml.pipeline import cli
from tests.synthetic import part_image


def test_rank_and_threshold_on_a_hand_made_list():
    scores = [0.05 * i for i in range(20, 0, -1)]  # 1.00, 0.95, ..., 0.05: n = 20, given unsorted
    found = conformal_threshold(scores, 0.1)
    # k = ceil(21 * 0.9) = ceil(18.9) = 19: the 19th smallest is 0.95; the threshold is the next float
    assert found.rank == 19 and found.kth_score == pytest.approx(0.95)
    assert found.threshold == np.nextafter(found.kth_score, np.inf) and found.threshold > found.kth_score
    assert found.false_alarms_on_them == 1 / 20  # only 1.00 is at or above it
    assert found.bound == pytest.approx(1 - 19 / 21) and found.bound <= 0.1
    record = found.record()
    assert (record["images"], record["rank"], record["false_alarm_rate"]) == (20, 19, 0.1)


def test_the_rank_is_computed_exactly_not_in_binary_floats():
    # (n + 1)(1 - rate) = 150 · 0.82 = 123 exactly; in floats it is 123.00000000000001, whose ceiling
    # 124 would flag fewer good parts than the rate asked for (and the rank may pass n for n = minimum).
    assert (149 + 1) * (1 - 0.18) > 123
    assert conformal_threshold(np.arange(149.0), 0.18).rank == 123
    assert conformal_threshold(np.arange(19.0), 0.05).rank == 19
    assert conformal_threshold(np.arange(99.0), 0.01).rank == 99  # the largest score: no false alarm on them
    assert conformal_threshold(np.arange(99.0), 0.01).false_alarms_on_them == 0


@pytest.mark.parametrize(
    ("rate", "needed"), [(0.01, 99), (0.05, 19), (0.1, 9), (0.2, 4), (0.25, 3), (0.3, 3), (0.5, 1)]
)
def test_minimum_images(rate, needed):
    assert minimum_images(rate) == needed
    conformal_threshold(np.arange(float(needed)), rate)  # enough
    if needed > 1:
        with pytest.raises(NotEnoughImagesError, match=f"needs at least {needed}"):
            conformal_threshold(np.arange(float(needed - 1)), rate)


def test_too_few_images_says_how_many_are_needed():
    with pytest.raises(NotEnoughImagesError) as caught:
        conformal_threshold(np.linspace(0, 1, 40), 0.01, "good/bottle")
    message = str(caught.value)
    assert "good/bottle: 40 good images" in message and "needs at least 99" in message
    assert "lowest rate it allows is 1/(n+1) = 0.0244" in message


def test_ties_never_let_a_tied_good_score_through():
    found = conformal_threshold([0.5] * 10, 0.1)  # k = 10: every score equals s(k)
    assert found.threshold > 0.5 and found.false_alarms_on_them == 0


def test_false_alarm_probability_stays_under_the_rate():
    """The guarantee itself: over many calibration sets of exchangeable scores, a new good score is
    flagged with probability 1 - k/(n+1), never more than the rate."""
    rng = np.random.default_rng(0)
    n, rate, trials = 30, 0.1, 20000
    scores = rng.gamma(2.0, size=(trials, n + 1))  # any distribution: the rule does not care
    flagged = [scores[t, n] >= conformal_threshold(scores[t, :n], rate).threshold for t in range(trials)]
    expected = 1 - math.ceil((n + 1) * (1 - rate)) / (n + 1)  # k = 28: 3/31 = 0.0968
    spread = 4 * math.sqrt(expected * (1 - expected) / trials)
    assert abs(np.mean(flagged) - expected) < spread and expected <= rate


# --- on a deployment ---------------------------------------------------------------------------


@pytest.fixture
def deployment(tiny_deployment, tmp_path):
    return shutil.copytree(tiny_deployment, tmp_path / "deploy")


@pytest.fixture(scope="module")
def good_parts(tmp_path_factory):
    """19 good bottle images and 9 metal_nut ones: enough for rates 0.05 and 0.1."""
    root = tmp_path_factory.mktemp("good")
    for category, count, first in (("bottle", 19, 100), ("metal_nut", 9, 200)):
        (root / category).mkdir()
        for i in range(count):
            part_image(first + i, (90 + i, 80)).save(root / category / f"{i:03d}.png")
    (root / "bottle" / "notes.txt").write_text("not an image: ignored, as predict ignores it in a folder")
    return root


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def script_scores(deploy_dir, images):
    """predict_onnx.py's header line and its scores of ``images``, in one run."""
    child = subprocess.run(
        [sys.executable, deploy_dir / "predict_onnx.py", *images, "--category", "bottle"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    return lines[0], [float(line.split()[-2]) for line in lines[1:-1]]


def test_calibrate_writes_thresholds_the_scorers_use(deployment, good_parts, tiny_run, tmp_path):
    before = json.loads((deployment / "deploy.json").read_text())
    result = run("calibrate", deployment, "--good", good_parts, "--false-alarms", "0.1")
    assert result.exit_code == 0, result.output
    deploy = json.loads((deployment / "deploy.json").read_text())
    bottle, nut = deploy[CALIBRATION_KEY]["bottle"], deploy[CALIBRATION_KEY]["metal_nut"]
    assert (bottle["images"], bottle["rank"], nut["images"], nut["rank"]) == (
        19,
        18,
        9,
        9,
    )  # ceil(20·0.9), ceil(10·0.9)
    assert deploy["thresholds"] == {"bottle": bottle["threshold"], "metal_nut": nut["threshold"]}
    assert bottle["previous_threshold"] == before["thresholds"]["bottle"]
    assert bottle["previous_source"].startswith("exported: F1-max")
    assert bottle["false_alarms_on_them"] == pytest.approx(1 / 19) and nut["false_alarms_on_them"] == 0
    assert deploy["threshold_calibration"] == before["threshold_calibration"]  # the exported ones are kept
    assert "the 18th of 19 good scores" in result.output and "restart raml serve" in result.output

    # the deployment's own script decides at the new threshold, and says so; its scores are those
    # calibrate ranked: the 18th smallest is the threshold's
    header, scores = script_scores(deployment, sorted((good_parts / "bottle").glob("*.png")))
    assert f"threshold {bottle['threshold']:.6f}: calibrated on 19 good images for false alarms <= 0.1" in header
    assert len(scores) == 19 and abs(sorted(scores)[17] - bottle["kth_score"]) <= 1e-6

    # predict (torch) takes it with --deployment, and says where it comes from
    out = tmp_path / "predict"
    image = good_parts / "bottle" / "000.png"
    result = run(
        "predict", image, "--checkpoint", tiny_run, "--category", "bottle", "--out", out, "--deployment", deployment
    )
    assert result.exit_code == 0, result.output
    assert f"threshold {bottle['threshold']:.3f}: calibrated on 19 good images" in result.output
    assert f"{deployment / 'deploy.json'}" in result.output

    # a second calibration records the first as the previous threshold
    result = run(
        "calibrate", deployment, "--good", good_parts / "metal_nut", "--category", "metal_nut", "--false-alarms", "0.2"
    )
    assert result.exit_code == 0, result.output
    again = json.loads((deployment / "deploy.json").read_text())[CALIBRATION_KEY]["metal_nut"]
    assert again["rank"] == 8 and again["previous_threshold"] == nut["threshold"]  # ceil(10·0.8)
    assert again["previous_source"].startswith("calibrated on 9 good images")


def test_refusals_leave_deploy_json_unchanged(deployment, good_parts, tmp_path):
    original = (deployment / "deploy.json").read_bytes()
    result = run("calibrate", deployment, "--good", good_parts)  # 0.01 needs 99
    assert result.exit_code == 1 and "19 good images, and a false-alarm rate of 0.01 needs at least 99" in result.output
    stranger = shutil.copytree(good_parts, tmp_path / "good")
    (stranger / "screw").mkdir()
    result = run("calibrate", deployment, "--good", stranger, "--false-alarms", "0.1")
    assert result.exit_code == 1 and "has folders screw, which are not categories" in result.output
    shutil.rmtree(stranger / "screw")
    (stranger / "bottle" / "007.png").write_bytes((stranger / "bottle" / "008.png").read_bytes()[:100])
    result = run("calibrate", deployment, "--good", stranger, "--false-alarms", "0.1")
    assert result.exit_code == 1 and "1 good images could not be scored, nothing was changed" in result.output
    assert "007.png" in result.output
    result = run(
        "calibrate", deployment, "--good", good_parts / "bottle", "--category", "screw", "--false-alarms", "0.1"
    )
    assert result.exit_code == 1 and "--category screw: not in the deployment" in result.output
    result = run("calibrate", deployment, "--good", good_parts, "--false-alarms", "1.5")
    assert result.exit_code == 2
    assert (deployment / "deploy.json").read_bytes() == original


def test_predict_refuses_a_deployment_of_another_checkpoint(deployment, good_parts, tiny_run, tmp_path):
    deploy = json.loads((deployment / "deploy.json").read_text())
    deploy["checkpoint_sha256"] = "0" * 64
    (deployment / "deploy.json").write_text(json.dumps(deploy))
    image = good_parts / "bottle" / "000.png"
    result = run(
        "predict",
        image,
        "--checkpoint",
        tiny_run,
        "--category",
        "bottle",
        "--out",
        tmp_path / "p",
        "--deployment",
        deployment,
    )
    assert result.exit_code == 1 and "was exported from another checkpoint" in result.output
