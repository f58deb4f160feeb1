"""Margin sweeps: one table, resumable, parallel."""
import json

import pytest
from click.testing import CliRunner

from cache import read_cache
from pipeline import cli
from train import sweep as sweep_module
from train.sweep import run_sweep, summary_markdown
from train.synthetic import write_synthetic_cache

TINY = dict(epochs=1, hidden_dim=32, attn_dim=8, feature_dim=16)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    shape = {"bottle": (20, 10, 10, 900), "screw": (20, 10, 10, 1024)}
    return read_cache(write_synthetic_cache(tmp_path_factory.mktemp("sweep") / "cache", shape, dim=32,
                                            separation=3.0))


def _counting_fit(monkeypatch):
    calls = []
    real_fit = sweep_module.fit

    def fit(table, config, **kwargs):
        calls.append((config.margin, config.seed))
        return real_fit(table, config, **kwargs)
    monkeypatch.setattr(sweep_module, "fit", fit)
    return calls


def test_sweep_writes_runs_and_one_table(tmp_path, table):
    summary = run_sweep(table, ["adaptive", "strong"], [0, 1], tmp_path, **TINY)
    for name in ("adaptive-seed0", "adaptive-seed1", "strong-seed0", "strong-seed1"):
        assert {"checkpoint.pt", "config.json", "split.json", "history.json", "metrics.json"} <= \
               {p.name for p in (tmp_path / name).iterdir()}
    runs = [json.loads((tmp_path / f"adaptive-seed{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert runs[0]["heldout_hash"] == runs[1]["heldout_hash"] == summary["heldout_hash"]
    entry = summary["configurations"]["adaptive"]
    assert entry["mean_auroc"]["n"] == 2
    assert entry["mean_auroc"]["mean"] == pytest.approx((runs[0]["mean_auroc"] + runs[1]["mean_auroc"]) / 2)
    assert set(entry["categories"]) == {"bottle", "screw"}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown == summary_markdown(summary)
    assert "| adaptive | 2 |" in markdown and "| screw |" in markdown and "meaningless" in markdown


def test_sweep_resumes_without_retraining_finished_runs(tmp_path, table, monkeypatch):
    run_sweep(table, ["fixed"], [0], tmp_path, **TINY)
    first = (tmp_path / "fixed-seed0" / "checkpoint.pt").stat().st_mtime_ns
    calls = _counting_fit(monkeypatch)
    summary = run_sweep(table, ["fixed"], [0, 1], tmp_path, **TINY)
    assert calls == [("fixed", 1)]                       # only the missing run was trained
    assert (tmp_path / "fixed-seed0" / "checkpoint.pt").stat().st_mtime_ns == first
    assert summary["configurations"]["fixed"]["mean_auroc"]["n"] == 2


def test_half_written_run_is_retrained(tmp_path, table, monkeypatch):
    run_sweep(table, ["fixed"], [0], tmp_path, **TINY)
    (tmp_path / "fixed-seed0" / "metrics.json").unlink()   # killed before it finished
    calls = _counting_fit(monkeypatch)
    run_sweep(table, ["fixed"], [0], tmp_path, **TINY)
    assert calls == [("fixed", 0)]


def test_sweep_refuses_to_mix_settings(tmp_path, table):
    run_sweep(table, ["fixed"], [0], tmp_path, **TINY)
    with pytest.raises(ValueError, match="epochs=1"):
        run_sweep(table, ["fixed"], [0], tmp_path, **{**TINY, "epochs": 2})


def test_parallel_sweep_matches_sequential(tmp_path, table):
    sequential = run_sweep(table, ["fixed", "strong"], [0], tmp_path / "seq", **TINY)
    parallel = run_sweep(table, ["fixed", "strong"], [0], tmp_path / "par", jobs=2, **TINY)
    assert parallel["configurations"] == sequential["configurations"]


def test_sweep_cli_on_an_extracted_cache(tmp_path, mvtec_cache):
    args = ["sweep", "--cache-dir", str(mvtec_cache), "--margins", "fixed,strong", "--seeds", "0",
            "--out", str(tmp_path), "--epochs", "1", "--batch-size", "8", "--hidden-dim", "32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "summary.md").exists() and "| fixed | 1 |" in result.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "2 of 2 runs already finished" in again.output
    bad = CliRunner().invoke(cli, ["sweep", "--cache-dir", str(mvtec_cache), "--margins", "medium",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "medium" in bad.output and "Traceback" not in bad.output
