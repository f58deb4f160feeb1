"""The demo end to end on textile images with the tiny model: extract → train ×3 → evaluate → report."""
import json

from click.testing import CliRunner

from pipeline import cli

TINY = "extract/model_configs/raml-tiny-test.json"


def test_demo_runs_the_whole_chain_and_says_the_weights_are_random(tmp_path):
    # The tiny config has no pretrained weights anywhere: the demo must say so and fall back openly.
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--model", TINY, "--limit", "24",
                                      "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "are not available" in result.output and "RANDOM weights" in result.output
    assert "NOT MEANINGFUL" in result.output
    results = json.loads((tmp_path / "results-random" / "textile" / "results.json").read_text())
    assert set(results) == {"adaptive", "fixed", "strong"}
    assert all(entry["random_weights"] and not entry["meaningful"] for entry in results.values())
    assert {entry["protocol"]["image_list_hash"] for entry in results.values()} != set()
    assert len({entry["protocol"]["image_list_hash"] for entry in results.values()}) == 1
    report = tmp_path / "report-random" / "report.md"
    assert f"Report: {report}" in result.output
    text = report.read_text()
    assert "| category | adaptive † | fixed † | strong † |" in text and "NOT MEANINGFUL" in text
    assert (tmp_path / "report-random" / "holdout_textile_maps.png").is_file()   # textile images are reachable
