"""The demo end to end on textile images with the tiny model: extract → sweep → evaluate → WinCLIP → report."""

import json

from click.testing import CliRunner

from raml.evaluate.demo import DEFAULT_LIMIT
from raml.extract.datasets import read_dataset
from raml.extract.plan import limit_per_category
from raml.pipeline import cli
from raml.train.split import heldout_counts

TINY = "extract/model_configs/raml-tiny-test.json"


def test_the_default_limit_is_the_fewest_images_with_15_held_out_per_class():
    _, records = read_dataset("textile", None)

    def held_out(limit):
        chosen = limit_per_category(records, limit)
        normal = sum(record.label == 0 for record in chosen)
        return heldout_counts([normal, len(chosen) - normal], 0.2)

    assert held_out(DEFAULT_LIMIT) == [15, 15]
    assert min(held_out(DEFAULT_LIMIT - 1)) == 14


def test_demo_compares_raml_seeds_with_winclip_and_says_the_weights_are_random(tmp_path, monkeypatch):
    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))  # the ONNX export goes here
    # The tiny config has no pretrained weights anywhere: the demo must say so, for each model, and fall back openly.
    result = CliRunner().invoke(
        cli,
        [
            "demo",
            "--out",
            str(tmp_path),
            "--model",
            TINY,
            "--winclip-model",
            TINY,
            "--limit",
            "24",
            "--epochs",
            "2",
            "--seeds",
            "0,1",
        ],
    )
    assert result.exit_code == 0, result.output
    for what in ("RAML", "WinCLIP"):
        assert (
            f"for {what} are not available" in result.output and f"{what} now runs with RANDOM weights" in result.output
        )
    assert "demo: expected to take about" in result.output and "GFLOP/s (fp32 matrix product)" in result.output
    assert "--engine auto" in result.output and "auto: picked --engine" in result.output
    assert "--maps examples" in result.output
    assert "NOT MEANINGFUL" in result.output
    raml = json.loads((tmp_path / "results-random" / "raml" / "results.json").read_text())
    winclip = json.loads((tmp_path / "results-random" / "winclip" / "results.json").read_text())
    assert set(raml) == {"adaptive", "fixed", "strong"} and set(winclip) == {"WinCLIP zero-shot"}
    for name in ("knn-patches", "zero-shot-text"):  # maps from the cached patch tokens; no masks: no pixel metric
        entry = json.loads((tmp_path / "results-random" / name / "results.json").read_text())[name]
        assert entry["anomaly_maps"]["key"] == name and entry["pixel"]["not_available"] == {
            "textile": "no defect masks"
        }
    assert all("pixel" not in entry for entry in raml.values())  # no masks: no pixel head
    assert all(entry["seeds"] == [0, 1] and entry["auroc_over_seeds"]["n"] == 2 for entry in raml.values())
    entries = [*raml.values(), *winclip.values()]
    assert all(entry["random_weights"] and not entry["meaningful"] for entry in entries)
    assert len({entry["protocol"]["image_list_hash"] for entry in entries}) == 1  # the same held-out images
    report = tmp_path / "report-random" / "report.md"
    assert f"Report: {report}" in result.output
    text = report.read_text()
    assert (
        "| category | knn-patches † | adaptive † | fixed † | strong † | WinCLIP zero-shot † | zero-shot-text † |"
        in text
        and "NOT MEANINGFUL" in text
    )
    assert "| n (seeds) | 1 | 2 | 2 | 2 | 1 | 1 |" in text
    assert (tmp_path / "report-random" / "holdout_textile_maps.png").is_file()  # textile images are reachable


def test_demo_extracts_in_fp32_when_every_reduced_precision_is_refused(tmp_path, monkeypatch):
    from raml.extract import auto_engine, fidelity
    from raml.extract.engines import PRECISIONS

    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setattr(fidelity, "MIN_COSINE", 1.5)  # no encoder below fp32 can pass
    # int8 the fastest, whatever the tiny model's real timings (a few ms each, in any order)
    monkeypatch.setattr(
        auto_engine,
        "candidates",
        lambda device, precision=None: [
            e for e in ("torch", "onnx", "onnx-int8") if precision in (None, PRECISIONS[e])
        ],
    )
    monkeypatch.setattr(
        auto_engine, "time_engine", lambda backbone: {"torch": 3.0, "onnx": 2.0}.get(backbone.engine, 1.0)
    )
    result = CliRunner().invoke(
        cli,
        [
            "demo",
            "--out",
            str(tmp_path),
            "--model",
            TINY,
            "--winclip-model",
            TINY,
            "--limit",
            "24",
            "--epochs",
            "1",
            "--seeds",
            "0,1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "auto: --engine onnx-int8 is not used: the int8-w7 image encoder (--engine onnx-int8) is too far" in (
        result.output
    )
    from raml.cache import read_cache

    table = read_cache(tmp_path / "cache-random")
    assert table.meta["precision"] == "fp32" and f"auto: picked --engine {table.engines[0]} (fp32)" in result.output
