"""Sweeps: runs trained together as one batched pass equal runs trained alone; one table, the same
numbers as evaluate; resumable; grouped by shape."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raml.errors import UserError
from raml.evaluate.run import evaluate_checkpoints
from raml.evaluate.sweep import run_sweep, summary_markdown
from raml.pipeline import cli
from raml.train import sweep as sweep_module
from raml.train.checkpoint import load_checkpoint
from raml.train.config import make_config
from raml.train.fit import fit, fit_runs, group_key
from raml.train.infer import score_rows
from raml.train.sweep import grid_configurations, plan_passes

TINY = dict(epochs=1, hidden_dim=32, attn_dim=8, feature_dim=16)
SMALL = dict(epochs=3, lr=1e-3, hidden_dim=32, attn_dim=8, feature_dim=16)


@pytest.fixture(scope="module")
def table(two_category_table):
    return two_category_table


def _counting_passes(monkeypatch):
    calls = []
    real = sweep_module.fit_runs

    def fit_runs_counted(table, configs, **kwargs):
        calls.append(sorted((config.margin, config.seed) for config in configs))
        return real(table, configs, **kwargs)

    monkeypatch.setattr(sweep_module, "fit_runs", fit_runs_counted)
    return calls


# --- the batched pass -------------------------------------------------------------------------------

ENSEMBLE = [
    make_config("adaptive", seed=0, **SMALL),
    make_config("fixed", seed=1, **SMALL),
    make_config(
        "strong", seed=2, lr=3e-3, weight_decay=0.05, temperature=0.2, **{k: v for k, v in SMALL.items() if k != "lr"}
    ),
    make_config("adaptive", seed=3, r_max="900", gamma=0.0, grad_clip_norm=0.5, **SMALL),
]


@pytest.fixture(scope="module")
def ensemble_and_alone(table):
    return fit_runs(table, ENSEMBLE), [fit(table, config) for config in ENSEMBLE]


def test_runs_trained_together_score_like_runs_trained_alone(table, ensemble_and_alone):
    together, alone = ensemble_and_alone
    heldout = together[0].split.heldout
    for config, batched, single in zip(ENSEMBLE, together, alone):
        assert batched.runs_in_pass == len(ENSEMBLE) and single.runs_in_pass == 1
        scores = [
            score_rows(head.model, table, heldout, config.visual_weight, config.text_weight)["final"]
            for head in (batched, single)
        ]
        assert np.abs(scores[0] - scores[1]).max() < 1e-4
    # the runs really differ from each other (seeds, margins, learning rates)
    first, second = (score_rows(head.model, table, heldout)["final"] for head in together[:2])
    assert np.abs(first - second).max() > 1e-3


def test_each_run_keeps_its_own_loss_state_and_history(ensemble_and_alone):
    together, alone = ensemble_and_alone
    for batched, single in zip(together, alone):
        for name in ("center", "sigma", "difficulty"):
            assert torch.allclose(batched.loss_state[name], single.loss_state[name], atol=1e-5)
        assert torch.equal(batched.loss_state["difficulty_seen"], single.loss_state["difficulty_seen"])
        for a, b in zip(batched.history, single.history):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
            assert a["anomalous_inside_margin"] == pytest.approx(b["anomalous_inside_margin"])
    margins = [head.history[-1]["mean_margin"] for head in together]
    assert margins[2] == pytest.approx(1.0)  # strong: m = 1.0 whatever σ
    assert margins[1] == pytest.approx(0.5)


def test_a_run_of_a_pass_writes_a_normal_checkpoint(tmp_path, table, ensemble_and_alone):
    from raml.train.fit import write_run

    batched = ensemble_and_alone[0][1]
    write_run(tmp_path / "run", batched)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.config == ENSEMBLE[1].to_dict()
    for name, tensor in batched.model.state_dict().items():
        assert torch.equal(tensor, checkpoint.model.state_dict()[name])


def test_runs_that_change_shapes_cannot_share_a_pass(table):
    with pytest.raises(ValueError, match="separate passes"):
        fit_runs(table, [make_config("adaptive", **TINY), make_config("adaptive", **{**TINY, "hidden_dim": 16})])


def test_sweep_groups_runs_by_shape_changing_settings():
    configurations = grid_configurations(["adaptive", "fixed"], {"hidden_dim": [16, 32], "lr": [1e-3, 1e-4]}, epochs=1)
    runs = {
        f"{name}-seed{seed}": make_config(
            overrides["margin"], seed=seed, **{k: v for k, v in overrides.items() if k != "margin"}
        )
        for name, overrides in configurations.items()
        for seed in (0, 1)
    }
    passes = plan_passes(runs)
    assert len(runs) == 16 and [len(group) for group in passes] == [8, 8]  # hidden_dim splits, lr and margin do not
    for group in passes:
        assert len({group_key(config) for config in group.values()}) == 1
        assert {config.lr for config in group.values()} == {1e-3, 1e-4}


def test_grid_names():
    assert list(grid_configurations(["fixed"], {"lr": [1e-3, 1e-4], "loss_variant": ["raml", "original"]})) == [
        "fixed-lr0.001-loss_variantraml",
        "fixed-lr0.001-loss_variantoriginal",
        "fixed-lr0.0001-loss_variantraml",
        "fixed-lr0.0001-loss_variantoriginal",
    ]


# --- the sweep command ---------------------------------------------------------------------------------


def test_sweep_writes_runs_and_one_table_equal_to_evaluate(tmp_path, table):
    summary = run_sweep(
        table, grid_configurations(["adaptive", "strong"], **TINY), [0, 1], tmp_path / "sweep", n_resamples=50
    )
    for name in ("adaptive-seed0", "adaptive-seed1", "strong-seed0", "strong-seed1"):
        assert {"checkpoint.pt", "config.json", "split.json", "history.json", "metrics.json"} <= {
            p.name for p in (tmp_path / "sweep" / name).iterdir()
        }
    assert summary["passes"] == [["adaptive-seed0", "adaptive-seed1", "strong-seed0", "strong-seed1"]]
    _, entries = evaluate_checkpoints(
        [tmp_path / "sweep"], table.cache_dir, tmp_path / "evaluated", n_resamples=50, log=lambda line: None
    )
    for name in ("adaptive", "strong"):
        entry, row = entries[name], summary["configurations"][name]
        assert row["mean_auroc"] == entry["auroc_over_seeds"] and row["mean_auroc"]["n"] == 2
        assert row["categories"] == {c: stats["auroc_over_seeds"] for c, stats in entry["categories"].items()}
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text()) == summary
    markdown = (tmp_path / "sweep" / "summary.md").read_text()
    assert markdown == summary_markdown(summary)
    assert "| adaptive | 2 |" in markdown and "(n=2)" in markdown and "| screw |" in markdown
    assert "meaningless" in markdown


def test_sweep_resumes_without_retraining_finished_runs(tmp_path, table, monkeypatch):
    run_sweep(table, grid_configurations(["fixed"], **TINY), [0], tmp_path, n_resamples=10)
    first = (tmp_path / "fixed-seed0" / "checkpoint.pt").stat().st_mtime_ns
    calls = _counting_passes(monkeypatch)
    summary = run_sweep(table, grid_configurations(["fixed", "strong"], **TINY), [0, 1], tmp_path, n_resamples=10)
    assert calls == [[("fixed", 1), ("strong", 0), ("strong", 1)]]  # one pass of the missing runs
    assert (tmp_path / "fixed-seed0" / "checkpoint.pt").stat().st_mtime_ns == first
    assert summary["configurations"]["fixed"]["mean_auroc"]["n"] == 2


def test_interrupted_pass_is_retrained_finished_runs_kept(tmp_path, table, monkeypatch):
    """A pass killed while it wrote its runs: the runs with metrics.json are kept, the others retrained."""
    run_sweep(table, grid_configurations(["fixed"], **TINY), [0, 1, 2], tmp_path, n_resamples=10)
    (tmp_path / "fixed-seed1" / "metrics.json").unlink()
    (tmp_path / "fixed-seed2" / "metrics.json").unlink()
    (tmp_path / "fixed-seed2" / "checkpoint.pt").unlink()
    kept = (tmp_path / "fixed-seed0" / "checkpoint.pt").stat().st_mtime_ns
    calls = _counting_passes(monkeypatch)
    run_sweep(table, grid_configurations(["fixed"], **TINY), [0, 1, 2], tmp_path, n_resamples=10)
    assert calls == [[("fixed", 1), ("fixed", 2)]]
    assert (tmp_path / "fixed-seed0" / "checkpoint.pt").stat().st_mtime_ns == kept


def test_sweep_refuses_runs_trained_differently(tmp_path, table):
    run_sweep(table, grid_configurations(["fixed"], **TINY), [0], tmp_path, n_resamples=10)
    with pytest.raises(UserError, match="epochs=1"):
        run_sweep(table, grid_configurations(["fixed"], **{**TINY, "epochs": 2}), [0], tmp_path)
    metrics_path = tmp_path / "fixed-seed0" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["fingerprint"]["backbone"] = "ViT-L-14"  # a run of another cache, same --out
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="cache backbone='ViT-L-14'"):
        run_sweep(table, grid_configurations(["fixed"], **TINY), [0], tmp_path)
    metrics["fingerprint"]["backbone"], metrics["heldout_hash"] = table.meta["backbone"], "0" * 64
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="held-out images differ"):
        run_sweep(table, grid_configurations(["fixed"], **TINY), [0], tmp_path)


def test_parallel_sweep_matches_sequential(tmp_path, table):
    configurations = grid_configurations(["fixed"], {"hidden_dim": [16, 32]}, epochs=1, attn_dim=8, feature_dim=16)
    sequential = run_sweep(table, configurations, [0], tmp_path / "seq", n_resamples=10)
    parallel = run_sweep(table, configurations, [0], tmp_path / "par", jobs=2, n_resamples=10)
    assert len(parallel["passes"]) == 2
    assert parallel["configurations"] == sequential["configurations"]


def test_sweep_cli_on_an_extracted_cache(tmp_path, mvtec_cache):
    args = [
        "sweep",
        "--cache-dir",
        str(mvtec_cache),
        "--margins",
        "fixed,strong",
        "--seeds",
        "0",
        "--vary",
        "lr=1e-3,1e-4",
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--hidden-dim",
        "32",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "pass 1/1: 4 runs" in result.output
    assert (tmp_path / "summary.md").exists() and "| fixed-lr0.001 | 1 |" in result.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "4 of 4 runs already finished" in again.output
    bad = CliRunner().invoke(
        cli, ["sweep", "--cache-dir", str(mvtec_cache), "--margins", "medium", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "medium" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(
        cli, ["sweep", "--cache-dir", str(mvtec_cache), "--vary", "lr=fast", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "--vary 'lr=fast'" in bad.output and "Traceback" not in bad.output
