"""Experiment tracking: a real MLflow SQLite store in a temporary folder, read back with MLflow's own
client. Every number equals the results file's; a sweep is a parent with a child per configuration ×
seed; a diverged run is FAILED and tagged; evaluating again updates the run; a store that cannot be
written costs no result, and ``raml track`` sends it later."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from raml.pipeline import cli

mlflow = pytest.importorskip("mlflow", reason="tracking tests need the extra raml[track] (MLflow)")

TINY = ["--epochs", "2", "--hidden-dim", "32", "--attn-dim", "8", "--feature-dim", "16"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def client(store):
    return mlflow.MlflowClient(tracking_uri=store)


def raml(*args):
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def runs_of(client, experiment):
    found = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])} if found else {}


def test_train_then_evaluate_logs_every_number_of_the_files_on_one_run(two_category_table, store, client, tmp_path):
    cache, run_dir = two_category_table.cache_dir, tmp_path / "run"
    output = raml("train", "--cache-dir", cache, "--out", run_dir, *TINY, "--tracking-uri", store, "--experiment", "t1")
    assert f"tracking: {run_dir} → {store}" in output
    raml("evaluate", "--checkpoint", run_dir, "--cache-dir", cache, "--out", tmp_path / "results", "--bootstrap", 50)
    assert len(runs_of(client, "t1")) == 1  # evaluate without --track sent nothing
    raml(
        "evaluate", "--checkpoint", run_dir, "--cache-dir", cache, "--out", tmp_path / "results", "--bootstrap", 50,
        "--track", "--tracking-uri", store,
    )  # fmt: skip
    (run,) = runs_of(client, "t1").values()
    assert run.info.run_id == json.loads((run_dir / "tracking.json").read_text())[store]["run_id"]
    # parameters: the whole config, the backbone, the fingerprint, the split
    config = json.loads((run_dir / "config.json").read_text())
    assert {key: run.data.params[key] for key in config} == {key: str(value) for key, value in config.items()}
    split = json.loads((run_dir / "split.json").read_text())
    assert run.data.params["split.heldout_hash"] == split["heldout_hash"]
    assert run.data.params["backbone.name"] == "synthetic" and run.data.params["backbone.random_weights"] == "True"
    assert len(run.data.params["cache.fingerprint"]) == 16
    # each epoch's loss terms and anomalous-inside-margin fraction, as in history.json
    history = json.loads((run_dir / "history.json").read_text())
    for term in ("loss", "center", "margin", "contrastive", "bce", "anomalous_inside_margin"):
        logged = client.get_metric_history(run.info.run_id, f"train/{term}")
        assert [(m.step, m.value) for m in logged] == [(r["epoch"], pytest.approx(r[term])) for r in history]
    # every result equal to results.json: the mean, its CI, AP, F1-max, the seed count, per category
    (entry,) = json.loads((tmp_path / "results" / "results.json").read_text()).values()
    metrics = run.data.metrics
    assert metrics["image_auroc"] == entry["mean_auroc"]
    assert [metrics["image_auroc_ci95_low"], metrics["image_auroc_ci95_high"]] == entry["mean_auroc_ci95"]
    assert metrics["image_ap"] == entry["mean_average_precision"] and metrics["image_f1_max"] == entry["mean_f1_max"]
    assert metrics["n_seeds"] == entry["auroc_over_seeds"]["n"] == 1
    for category, stats in entry["categories"].items():
        assert metrics[f"image_auroc/{category}"] == stats["auroc"]
        assert metrics[f"image_auroc_ci95_low/{category}"] == stats["auroc_ci95"][0]
        assert metrics[f"image_auroc_ci95_high/{category}"] == stats["auroc_ci95"][1]
        assert metrics[f"image_ap/{category}"] == stats["average_precision"]
        assert metrics[f"image_f1_max/{category}"] == stats["f1_max"]
    assert run.data.tags["raml.meaningful"] == "no: random weights"
    assert "NOT MEANINGFUL" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["raml.code_version"].startswith("raml ")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "history.json", "results.json"}

    # evaluated again with other settings: the same run, its numbers replaced by the new file's
    raml(
        "evaluate", "--checkpoint", run_dir, "--cache-dir", cache, "--out", tmp_path / "again", "--bootstrap", 20,
        "--bootstrap-seed", 3, "--track", "--tracking-uri", store,
    )  # fmt: skip
    (again,) = runs_of(client, "t1").values()
    assert again.info.run_id == run.info.run_id
    (entry,) = json.loads((tmp_path / "again" / "results.json").read_text()).values()
    assert [again.data.metrics["image_auroc_ci95_low"], again.data.metrics["image_auroc_ci95_high"]] == entry[
        "mean_auroc_ci95"
    ]
    # the curves were sent once, not once per evaluation
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == len(history)


def test_a_sweep_is_a_parent_with_a_child_per_configuration_and_seed(two_category_table, store, client, tmp_path):
    sweep_dir = tmp_path / "sweep"
    output = raml(
        "sweep", "--cache-dir", two_category_table.cache_dir, "--margins", "fixed", "--vary", "lr=0.001,1000",
        "--seeds", "0,1", "--out", sweep_dir, *TINY, "--track", "--tracking-uri", store, "--experiment", "t2",
    )  # fmt: skip
    # progress in plain lines (not a terminal): one pass of 2 epochs for the 4 runs, 2 runs scored
    assert "sweep training: 2/2 epochs (100 %)" in output and "evaluate: 2/2 runs (100 %)" in output
    runs = runs_of(client, "t2")
    parent = runs.pop("sweep")
    assert sorted(runs) == [
        "fixed-lr0.001-seed0",
        "fixed-lr0.001-seed1",
        "fixed-lr1000.0-seed0",
        "fixed-lr1000.0-seed1",
    ]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs.values()} == {parent.info.run_id}
    # the diverged runs: FAILED, tagged with where they diverged, no results
    for name in ("fixed-lr1000.0-seed0", "fixed-lr1000.0-seed1"):
        assert runs[name].info.status == "FAILED"
        assert "not finite" in runs[name].data.tags["raml.diverged"] and "image_auroc" not in runs[name].data.metrics
    assert "fixed-lr1000.0-seed0" in parent.data.tags["raml.diverged"]
    # each seed's own numbers on its child, the configuration's on the parent: all from results.json
    entry = json.loads((sweep_dir / "results" / "results.json").read_text())["fixed-lr0.001"]
    for index, seed in enumerate(entry["seeds"]):
        child = runs[f"fixed-lr0.001-seed{seed}"].data.metrics
        assert child["image_auroc"] == entry["per_seed"]["auroc"][index]
        assert child["image_ap"] == entry["per_seed"]["average_precision"][index]
        assert child["image_f1_max"] == entry["per_seed"]["f1_max"][index]
        for category, stats in entry["categories"].items():
            assert child[f"image_auroc/{category}"] == stats["auroc_per_seed"][index]
    metrics = parent.data.metrics
    assert metrics["fixed-lr0.001.image_auroc"] == entry["mean_auroc"]
    assert metrics["fixed-lr0.001.image_auroc_std"] == entry["std_auroc"]
    assert metrics["fixed-lr0.001.n_seeds"] == 2
    # sent again (raml track): the same runs, no copies
    raml("track", sweep_dir, "--tracking-uri", store)
    assert {name: run.info.run_id for name, run in runs_of(client, "t2").items()} == {
        **{name: run.info.run_id for name, run in runs.items()},
        "sweep": parent.info.run_id,
    }


def test_a_store_that_cannot_be_written_costs_no_result(two_category_table, store, client, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    broken = f"sqlite:///{blocker / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["train", "--cache-dir", str(two_category_table.cache_dir), "--out", str(run_dir), *TINY,
              "--tracking-uri", broken]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert all((run_dir / name).is_file() for name in ("checkpoint.pt", "config.json", "history.json", "split.json"))
    (line,) = [line for line in result.output.splitlines() if line.startswith("tracking:")]
    assert line.startswith("tracking: not tracked (") and line.endswith(
        f"send it later: raml track {run_dir} --tracking-uri {broken}"
    )
    assert not (run_dir / "tracking.json").exists()
    raml("track", run_dir, "--tracking-uri", store, "--experiment", "t3")  # later, to a store that works
    (run,) = runs_of(client, "t3").values()
    assert run.data.params["lr"] == json.loads((run_dir / "config.json").read_text())["lr"].__str__()


def test_a_tracking_server_that_is_down_costs_no_result(two_category_table, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["train", "--cache-dir", str(two_category_table.cache_dir), "--out", str(run_dir), *TINY,
              "--tracking-uri", "http://127.0.0.1:9"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (run_dir / "checkpoint.pt").is_file()
    assert "tracking: not tracked (" in result.output and f"raml track {run_dir}" in result.output


def test_raml_track_refuses_a_folder_raml_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store: ./mlflow.db
    result = CliRunner().invoke(cli, ["track", str(tmp_path)])
    assert result.exit_code != 0 and "not a directory RAML wrote" in result.output


def test_mlflow_is_imported_only_when_tracking_is_on():
    code = "import sys; import raml.pipeline, raml.cli.tracked_runs; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_an_ablation_is_a_parent_with_its_runs_rescored_rows_and_baselines(two_category_table, store, client, tmp_path):
    out = tmp_path / "ablate"
    raml(
        "ablate", "--cache-dir", two_category_table.cache_dir, "--ablations", "full,visual-score-only",
        "--baselines", "linear", "--seeds", "0,1", "--out", out, "--bootstrap", 30, *TINY,
        "--track", "--tracking-uri", store, "--experiment", "t4",
    )  # fmt: skip
    runs = runs_of(client, "t4")
    parent = runs.pop("ablate")
    assert sorted(runs) == ["full-seed0", "full-seed1", "linear", "visual-score-only"]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs.values()} == {parent.info.run_id}
    ablation = json.loads((out / "ablation.json").read_text())
    for row in ablation["rows"]:
        name = row["configuration"]
        assert parent.data.metrics[f"{name}.image_auroc"] == row["auroc"]["mean"]
        assert [parent.data.metrics[f"{name}.image_auroc_ci95_{end}"] for end in ("low", "high")] == row["auroc_ci95"]
        assert parent.data.metrics[f"{name}.delta_image_auroc"] == row["difference"]["value"]
        assert parent.data.metrics[f"{name}.delta_image_auroc_ci95_low"] == row["difference"]["ci95"][0]
    (linear,) = json.loads((out / "baselines" / "linear" / "results.json").read_text()).values()
    assert runs["linear"].data.metrics["image_auroc"] == linear["mean_auroc"]
    assert runs["linear"].data.params["method"] == linear["method"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.json", "ablation.png"}
