"""A run whose loss or gradient stops being finite stops at that step, says where and what to try,
and writes no checkpoint; in a batched sweep it is marked and the other runs go on."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raml.evaluate.report import write_report
from raml.evaluate.run import diverged_runs
from raml.evaluate.sweep import run_sweep
from raml.pipeline import cli
from raml.train import fit as fit_module
from raml.train.config import make_config
from raml.train.divergence import TrainingDiverged
from raml.train.fit import batch_order, fit, fit_runs
from raml.train.infer import score_rows
from raml.train.split import holdout_split

SMALL = dict(epochs=3, hidden_dim=32, attn_dim=8, feature_dim=16)


@pytest.fixture(scope="module")
def table(two_category_table):
    return two_category_table


def nan_loss_at(monkeypatch, call: int, term: str = "margin"):
    """Make the loss step return a NaN loss and ``term`` at its ``call``-th call; returns the calls made."""
    calls = []
    real = fit_module.loss_step

    def loss_step(config):
        step = real(config)

        def poisoned(*args):
            loss, stats, state = step(*args)
            calls.append(1)
            if len(calls) == call:
                index = fit_module.STEP_STATS.index(term)
                loss, stats = loss * np.nan, stats.clone()
                stats[index] = np.nan
            return loss, stats, state

        return poisoned

    monkeypatch.setattr(fit_module, "loss_step", loss_step)
    return calls


def test_the_first_nan_step_stops_the_run_and_names_it(table, monkeypatch):
    steps = len(holdout_split(table, 0, 0.2).train) // 16  # steps per epoch at batch size 16
    calls = nan_loss_at(monkeypatch, call=steps + 2, term="margin")  # epoch 2, step 2
    with pytest.raises(TrainingDiverged) as caught:
        fit(table, make_config("adaptive", seed=0, **SMALL))
    record = caught.value.record
    assert len(calls) == steps + 2  # stopped at once: no step after the NaN one
    assert (record["epoch"], record["step"], record["steps_per_epoch"]) == (2, 2, steps)
    assert record["term"] == "margin" and record["terms"]["margin"] == "nan"
    assert f"epoch 2, step 2 of {steps}" in str(caught.value)
    assert "lower --lr (now 5e-05; try 5e-06)" in str(caught.value)  # the default lr
    assert "--grad-clip-norm 1.0" in str(caught.value) and "No checkpoint was written" in str(caught.value)


def test_a_gradient_that_is_not_finite_is_divergence_too(table, monkeypatch):
    real = fit_module.RunStack

    def run_stack(*args, **kwargs):  # heads whose first layer's gradient is NaN from the start
        stack = real(*args, **kwargs)
        stack.leaves[0][stack.names[0]].register_hook(lambda grad: grad * np.nan)
        return stack

    monkeypatch.setattr(fit_module, "RunStack", run_stack)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1 of .*: a gradient stopped being finite"):
        fit(table, make_config("adaptive", seed=0, **SMALL))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_an_image_whose_features_are_nan_stops_the_run_at_its_first_batch(table, monkeypatch, compile):
    """The step is checked where it happens, compiled or not: the first batch holding the poisoned
    image (its place in the seeded batch order, worked out here) is the step named."""
    real, poisoned = fit_module.training_data, []

    def training_data(*args):
        data = real(*args)
        poisoned.append(int(torch.nonzero(data.labels == 1)[0]))  # an anomalous image: the initial center stays finite
        data.crops[poisoned[-1]] = float("nan")
        return data

    monkeypatch.setattr(fit_module, "training_data", training_data)
    with pytest.raises(TrainingDiverged) as caught:
        fit(table, make_config("adaptive", seed=3, **SMALL), compile=compile)
    images = len(holdout_split(table, 0, 0.2).train)
    generator = torch.Generator().manual_seed(3)
    epochs = (batch_order([generator], images, images // 16, 16, "cpu")[:, 0] for _ in range(3))  # drawn in turn
    first = next(
        (epoch, int(holding[0]) + 1)
        for epoch, batches in enumerate(epochs, start=1)
        if len(holding := torch.nonzero((batches == poisoned[0]).any(dim=1)))
    )
    record = caught.value.record
    assert (record["epoch"], record["step"]) == first
    assert record["term"] != "gradient"  # the loss itself is NaN


def test_train_lr_1e3_stops_with_the_step_and_writes_nothing(tmp_path):
    from raml.cache.synthetic import write_synthetic_cache

    cache = write_synthetic_cache(
        tmp_path / "cache", {"bottle": (40, 10, 10, 900), "screw": (40, 10, 10, 1024)}, dim=32
    )
    result = CliRunner().invoke(
        cli, ["train", "--cache-dir", str(cache), "--out", str(tmp_path / "run"), "--lr", "1e3", "--epochs", "3"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: training diverged (seed 0) at epoch 1, step " in result.output
    assert "Try: lower --lr (now 1000; try 100)" in result.output
    assert not (tmp_path / "run").exists()


def test_in_a_batched_pass_the_diverged_run_is_marked_and_the_others_train_as_alone(table):
    good, bad = make_config("adaptive", seed=0, lr=1e-3, **SMALL), make_config("adaptive", seed=1, lr=1e3, **SMALL)
    together = fit_runs(table, [good, bad])
    alone = fit(table, good)
    assert together[1].diverged is not None and together[1].thresholds == {}
    assert together[0].diverged is None and together[0].thresholds
    rows = np.arange(len(table.label))
    np.testing.assert_allclose(
        score_rows(together[0].model, table, rows)["final"], score_rows(alone.model, table, rows)["final"], atol=1e-4
    )
    with pytest.raises(ValueError, match="diverged run has no checkpoint"):
        fit_module.write_run("unused", together[1])


def test_a_sweep_scores_the_others_and_marks_the_diverged_in_summary_results_and_report(table, tmp_path):
    configurations = {"steady": {**SMALL, "lr": 1e-3}, "wild": {**SMALL, "lr": 1e3}}
    summary = run_sweep(table, configurations, [0, 1], tmp_path / "sweep", n_resamples=20)
    wild, steady = summary["configurations"]["wild"], summary["configurations"]["steady"]
    assert [record["run"] for record in wild["diverged"]] == ["wild-seed0", "wild-seed1"]
    assert wild["mean_auroc"] is None and steady["mean_auroc"]["n"] == 2 and steady["diverged"] == []
    assert not (tmp_path / "sweep" / "wild-seed0" / "checkpoint.pt").exists()
    metrics = json.loads((tmp_path / "sweep" / "wild-seed0" / "metrics.json").read_text())
    assert metrics["diverged"]["term"] and metrics["diverged"]["epoch"] >= 1
    markdown = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| wild | 0 | – | – | seed 0 (epoch " in markdown
    # a re-run reuses the diverged runs as finished instead of training them again
    again = run_sweep(table, configurations, [0, 1], tmp_path / "sweep", n_resamples=20)
    assert again["passes"] == [] and again["configurations"]["wild"]["diverged"] == wild["diverged"]


def test_a_configuration_with_one_diverged_seed_keeps_the_other_in_results_and_report(table, tmp_path, monkeypatch):
    real = fit_module.fit_runs

    def one_seed_wild(table, configs, *args, **kwargs):  # seed 1 of "mixed" at lr 1e3, seed 0 at 1e-3
        configs = [
            config if config.seed == 0 else make_config("adaptive", seed=1, **{**SMALL, "lr": 1e3})
            for config in configs
        ]
        return real(table, configs, *args, **kwargs)

    monkeypatch.setattr("raml.train.sweep.fit_runs", one_seed_wild)
    monkeypatch.setattr("raml.train.sweep.finished_metrics", lambda *args: None)
    run_sweep(table, {"mixed": {**SMALL, "lr": 1e-3}}, [0, 1], tmp_path / "sweep", n_resamples=20)
    results = json.loads((tmp_path / "sweep" / "results" / "results.json").read_text())
    assert results["mixed"]["seeds"] == [0] and [r["seed"] for r in results["mixed"]["diverged"]] == [1]
    report = write_report([tmp_path / "sweep" / "results"], tmp_path / "report").read_text()
    assert "Diverged (their loss or gradient stopped being finite" in report and "mixed: seed 1 (epoch " in report


def test_evaluate_on_a_sweep_directory_names_its_diverged_runs(table, tmp_path):
    run_sweep(
        table, {"steady": {**SMALL, "lr": 1e-3}, "wild": {**SMALL, "lr": 1e3}}, [0], tmp_path / "sweep", n_resamples=20
    )
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "sweep"),
            "--cache-dir",
            str(table.cache_dir),
            "--out",
            str(tmp_path / "results"),
            "--bootstrap",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    entries = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(entries) == ["steady"]  # the wild configuration has no checkpoint to score
    assert "evaluate: wild-seed0 diverged (epoch " in result.output and "no checkpoint, not scored" in result.output
    assert diverged_runs([tmp_path / "sweep"])["wild"][0]["run"] == "wild-seed0"
