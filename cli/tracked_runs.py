"""What tracking sends, read from the directories RAML writes (the files stay the source of truth),
and the ``track`` command that sends existing directories.

- A training run (``train``, or one run of a sweep): its whole ``TrainConfig``, the backbone, the
  cache's fingerprint and the split's image-list hash as parameters; each epoch's loss terms, σ,
  mean margin and anomalous-inside-margin fraction as curves (``train/...``); config.json,
  split.json, history.json (and a sweep run's metrics.json) as artifacts; FAILED with a
  ``raml.diverged`` tag when its loss or gradient stopped being finite.
- Results (``results.json``, by ``evaluate``, a sweep, ``ablate`` or a baseline): each number of an
  entry, unchanged (``results_metrics``): image AUROC, AP and F1-max, pixel AUROC, AUPRO and pixel
  F1-max, with their std over seeds, bootstrap CI bounds, per category, and the seed count. A
  configuration of one run goes on that run; the seeds of a sweep each get their own seed's
  numbers, and the sweep's parent run the configuration's, under ``<configuration>.``. Results on
  another protocol than the run's holdout are kept apart under ``<protocol>-<dataset>.``.
- A sweep: a parent run with a child per configuration × seed. An ablation: a parent run with the
  same children, one child per rescored configuration and per baseline, and the table's
  differences from ``full`` with their paired bootstrap CI.

Tags on every run: ``raml.meaningful`` (``no: random weights`` when the features came from random
CLIP weights, with the warning as the run's description), ``raml.code_version``, ``raml.kind`` and
``raml.directory``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import lru_cache
from pathlib import Path

import click

from raml.cache.files import read_json_checked
from raml.cli.failures import fail_cleanly
from raml.cli.tracked_metrics import protocol_prefix, results_metrics, seed_metrics
from raml.cli.tracking import EXPERIMENT_OPTION, TRACKING_URI_OPTION, TrackedRun, Tracking, metric_key
from raml.errors import UserError
from raml.evaluate.file_names import RESULTS_JSON, SCORES_CSV, SUMMARY_JSON

ABLATION_JSON = "ablation.json"  # evaluate/ablate.py's table
RUN_FILES = ("config.json", "split.json", "history.json", "metrics.json")  # a training run's files, sent as artifacts
NOT_CURVES = ("epoch", "runs_in_pass")  # the numbers of a history entry that are not per-epoch curves


def describe(path, fingerprint: dict | None = None) -> list[TrackedRun]:
    """The MLflow runs a directory RAML wrote stands for: an ablation, a sweep, a training run or a
    results directory (``fingerprint``: a training run's cache fingerprint, when known)."""
    path = Path(path)
    if (path / ABLATION_JSON).is_file():
        return [ablation_run(path)]
    if is_sweep(path):
        return [sweep_run(path)]
    if (path / "config.json").is_file() and (path / "history.json").is_file():
        return [training_run(path, fingerprint)]
    if (path / RESULTS_JSON).is_file():
        return results_runs(path)
    raise UserError(
        f"{path}: not a directory RAML wrote (a run, a sweep, an ablation or results: none of config.json "
        f"and history.json, {SUMMARY_JSON}, {ABLATION_JSON}, {RESULTS_JSON} is there)"
    )


def is_sweep(path: Path) -> bool:
    return (path / SUMMARY_JSON).is_file() or any(path.glob("*/metrics.json"))


def _read(path: Path):
    return read_json_checked(path)


@lru_cache(maxsize=1)
def code_version() -> str:
    """``raml 0.1.0``, with the commit of a git checkout (``+modified`` with uncommitted changes)."""
    from raml.cli.version import version

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return f"raml {version()}"
    if commit.returncode != 0:
        return f"raml {version()}"
    return f"raml {version()} ({commit.stdout.strip()}{'+modified' if dirty.stdout.strip() else ''})"


def common_tags(kind: str, directory: Path, random_weights: bool) -> dict:
    from raml.evaluate.results import NOT_MEANINGFUL

    tags = {
        "raml.kind": kind,
        "raml.directory": str(directory.resolve()),
        "raml.code_version": code_version(),
        "raml.meaningful": "no: random weights" if random_weights else "yes",
    }
    if random_weights:
        tags["mlflow.note.content"] = NOT_MEANINGFUL  # the run's description in mlflow ui
    return tags


def written_at(path: Path) -> int:
    """When ``path`` was last written, in ms since the epoch (MLflow's time)."""
    return int(path.stat().st_mtime * 1000)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def backbone_params(fingerprint: dict) -> dict:
    """The backbone and the cache's fingerprint (its identity fields, and a digest of them)."""
    from raml.cache.format import FINGERPRINT_KEYS, fingerprint_field

    return {
        "backbone.name": fingerprint.get("backbone"),
        "backbone.weights": fingerprint.get("weights"),
        "backbone.random_weights": bool(fingerprint.get("random_weights")),
        "backbone.precision": fingerprint_field(fingerprint, "precision"),
        "backbone.input_size": fingerprint.get("input_size"),
        "backbone.model_config": fingerprint.get("model_config"),
        "cache.fingerprint": digest({key: fingerprint_field(fingerprint, key) for key in FINGERPRINT_KEYS}),
        "cache.dataset": (fingerprint.get("dataset") or {}).get("kind"),
    }


def bootstrap_tag(record: dict) -> dict:
    """How the CIs were resampled, as a tag (settings of a scoring, which may change from one to the next)."""
    bootstrap = record.get("bootstrap") or {}
    if not bootstrap:
        return {}
    return {"raml.bootstrap": f"{bootstrap.get('resamples')} resamples, seed {bootstrap.get('seed')}"}


def experiment_of(dataset: str | None) -> str:
    return f"raml-{dataset or 'other'}"


def training_run(run_dir: Path, fingerprint: dict | None = None) -> TrackedRun:
    """A training run directory (see the module docstring)."""
    from raml.train.config import TrainConfig

    config = TrainConfig.from_dict(_read(run_dir / "config.json")).to_dict()
    history, split = _read(run_dir / "history.json"), _read(run_dir / "split.json")
    metrics = _read(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    if fingerprint is None:
        fingerprint = metrics.get("fingerprint")
    if fingerprint is None:  # a train run: its checkpoint holds the fingerprint
        from raml.train.checkpoint import load_checkpoint

        fingerprint = load_checkpoint(run_dir).fingerprint
    series = {}
    for record in history:  # each loss term, σ, the mean margin, the anomalous-inside-margin fraction, ...
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in NOT_CURVES:
                series.setdefault(f"train/{name}", []).append((record["epoch"], value))
        for category, weight in (record.get("difficulty_weights") or {}).items():
            series.setdefault(f"train/difficulty_weight/{category}", []).append((record["epoch"], weight))
    tags = common_tags("training run", run_dir, bool(fingerprint.get("random_weights")))
    ended = written_at(run_dir / "history.json")
    seconds = sum(record.get("seconds", 0.0) for record in history if isinstance(record.get("seconds"), (int, float)))
    diverged = metrics.get("diverged")
    if diverged:
        tags["raml.diverged"] = (
            f"seed {diverged['seed']}: epoch {diverged['epoch']}, step {diverged['step']}: {diverged['term']} "
            f"not finite ({diverged.get('hint', '')})"
        )
    return TrackedRun(
        directory=run_dir,
        name=run_dir.name,
        experiment=experiment_of((fingerprint.get("dataset") or {}).get("kind")),
        identity=digest(config, history),
        params={
            **config,
            **backbone_params(fingerprint),
            "split.protocol": split.get("protocol", "holdout"),
            "split.heldout_hash": split.get("heldout_hash"),
            "split.train_hash": split.get("train_hash"),
            "split.heldout_images": len(split.get("heldout", [])),
        },
        series=series,
        tags=tags,
        artifacts=[run_dir / name for name in RUN_FILES if (run_dir / name).is_file()],
        failed=bool(diverged),
        started=ended - int(1000 * seconds),
        ended=ended,
    )


def run_dir_of(source: str, base: Path | None = None) -> Path | None:
    """The run directory of a results entry's source (a checkpoint path), if it is there."""
    path = Path(source)
    if base is not None and not path.is_absolute() and not path.exists():
        path = base / path.parent.name / path.name  # a sweep's own results: the runs beside them
    run_dir = path.parent if path.suffix == ".pt" else path
    return run_dir if (run_dir / "config.json").is_file() else None


def results_runs(results_dir: Path) -> list[TrackedRun]:
    """The runs a results directory's numbers belong to (see the module docstring): training runs
    with their numbers, sweeps with theirs, and a run of its own for a baseline."""
    sweeps, runs = {}, {}
    attach_results(results_dir, sweeps, runs)
    return list(sweeps.values()) + list(runs.values())


def attach_results(results_dir: Path, sweeps: dict, runs: dict, base: Path | None = None) -> None:
    """Add the numbers of ``results_dir``'s entries to the runs they belong to: ``sweeps`` (sweep
    directory → parent run) and ``runs`` (directory → run) gain the runs not there yet."""
    from raml.evaluate.results_file import read_results

    path = results_dir / RESULTS_JSON
    entries = read_results(path)
    files = [path] + ([results_dir / SCORES_CSV] if (results_dir / SCORES_CSV).is_file() else [])
    for config, entry in entries.items():
        prefix = protocol_prefix(entry)
        scoring = {"raml.results": str(results_dir.resolve()), **bootstrap_tag(entry)}  # where the numbers are from
        run_dirs = [run_dir_of(source, base) for source in entry.get("sources", [])]
        if not run_dirs or None in run_dirs:  # a baseline: no training run behind it
            if results_dir in runs:
                raise UserError(f"{path}: {len(entries)} entries without a training run; one run per directory")
            runs[results_dir] = baseline_run(results_dir, config, entry, files)
            continue
        parents = {run_dir.resolve().parent for run_dir in run_dirs}
        if len(parents) == 1 and is_sweep(run_dirs[0].parent):
            sweep_dir = run_dirs[0].parent
            parent = sweeps.get(sweep_dir.resolve()) or sweep_run(sweep_dir)
            sweeps[sweep_dir.resolve()] = parent
            parent.metrics.update(results_metrics(entry, f"{prefix}{metric_key(config)}."))
            parent.tags.update(scoring)
            parent.artifacts += [file for file in files if file not in parent.artifacts]
            scored = {run_dir.resolve() for run_dir in run_dirs}
            for child in parent.children:
                if child.directory.resolve() in scored:
                    child.metrics.update(seed_metrics(entry, child.params["seed"], prefix))
            continue
        for run_dir in run_dirs:  # runs of their own: a configuration of one run gets all its numbers
            run = runs.setdefault(run_dir.resolve(), training_run(run_dir))
            numbers = results_metrics(entry, prefix) if len(run_dirs) == 1 else {}
            run.metrics.update(numbers or seed_metrics(entry, run.params["seed"], prefix))
            run.tags.update(scoring)
            run.artifacts += [file for file in files if file not in run.artifacts]


def baseline_run(results_dir: Path, config: str, entry: dict, files: list) -> TrackedRun:
    """A results entry that no training run stands behind (a baseline): a run of its own."""
    protocol = entry.get("protocol") or {}
    params = {
        "method": entry.get("method", config),
        "configuration": config,
        "image_score": entry.get("image_score"),
        "protocol": protocol.get("name"),
        "split.heldout_hash": protocol.get("image_list_hash"),
        "split.heldout_images": protocol.get("n_images"),
        "backbone.name": entry.get("backbone"),
        "backbone.weights": entry.get("weights"),
        "backbone.random_weights": bool(entry.get("random_weights")),
    }
    params = {key: value for key, value in params.items() if value is not None}
    return TrackedRun(
        directory=results_dir,
        name=config,
        experiment=experiment_of((protocol.get("dataset") or {}).get("kind")),
        identity=digest(params),
        params=params,
        metrics=results_metrics(entry, protocol_prefix(entry)),
        tags={**common_tags("baseline", results_dir, bool(entry.get("random_weights"))), **bootstrap_tag(entry)},
        artifacts=list(files),
        started=written_at(files[0]),
        ended=written_at(files[0]),
    )


def sweep_run(sweep_dir: Path, kind: str = "sweep") -> TrackedRun:
    """A sweep: a parent run with a child per run directory, and the sweep's own results."""
    children = [training_run(config.parent) for config in sorted(sweep_dir.glob("*/config.json"))]
    if not children:
        raise UserError(f"{sweep_dir}: a sweep directory without runs (no */config.json)")
    first = children[0]
    shared = [key for key in first.params if key.startswith(("backbone.", "cache.", "split."))]
    parent = TrackedRun(
        directory=sweep_dir,
        name=sweep_dir.name,
        experiment=first.experiment,
        identity=digest({key: first.params[key] for key in shared}),
        params={key: first.params[key] for key in shared},
        tags={
            **{key: value for key, value in first.tags.items() if key != "raml.directory"},
            **common_tags(kind, sweep_dir, first.params["backbone.random_weights"]),
            "raml.runs": str(len(children)),
        },
        artifacts=[sweep_dir / name for name in (SUMMARY_JSON, "summary.md") if (sweep_dir / name).is_file()],
        children=children,
        started=min(child.started for child in children),
        ended=max(
            [child.ended for child in children]
            + [written_at(sweep_dir / SUMMARY_JSON)] * (sweep_dir / SUMMARY_JSON).is_file()
        ),
    )
    diverged = [child.name for child in children if child.failed]
    if diverged:
        parent.tags["raml.diverged"] = ", ".join(diverged)
    own_results = sweep_dir / "results"  # evaluate/sweep.py's RESULTS_DIR: the sweep's own scoring
    if (own_results / RESULTS_JSON).is_file():
        attach_results(own_results, {sweep_dir.resolve(): parent}, {}, base=sweep_dir)
    return parent


def ablation_run(out_dir: Path) -> TrackedRun:
    """An ablation: the sweep of its trained configurations, its rescored rows and baselines as
    children, and the table's differences from the reference on the parent."""
    ablation = _read(out_dir / ABLATION_JSON)
    parent = sweep_run(out_dir / "runs", kind="ablation")
    parent.directory, parent.name = out_dir, out_dir.name
    parent.tags["raml.directory"] = str(out_dir.resolve())
    parent.tags.update(bootstrap_tag(ablation))
    for row in ablation["rows"]:
        key = metric_key(row["configuration"]) + "."
        parent.metrics[key + "delta_image_auroc"] = row["difference"]["value"]
        parent.metrics[key + "delta_image_auroc_ci95_low"] = row["difference"]["ci95"][0]
        parent.metrics[key + "delta_image_auroc_ci95_high"] = row["difference"]["ci95"][1]
    for folder in ("rescored", "baselines"):
        for results in sorted((out_dir / folder).glob(f"*/{RESULTS_JSON}")):
            entries = _read(results)
            for config, entry in entries.items():
                parent.metrics.update(results_metrics(entry, metric_key(config) + "."))
            if folder == "baselines":
                parent.children += results_runs(results.parent)
            else:
                parent.children.append(rescored_run(results.parent, entries, parent))
    parent.artifacts += [
        out_dir / name for name in (ABLATION_JSON, "ablation.md", "ablation.png") if (out_dir / name).is_file()
    ]
    parent.ended = max(parent.ended, written_at(out_dir / ABLATION_JSON))
    return parent


def rescored_run(results_dir: Path, entries: dict, parent: TrackedRun) -> TrackedRun:
    """A configuration of an ablation that rescored the reference's runs (no training of its own)."""
    ((config, entry),) = entries.items()
    params = {
        **{key: value for key, value in parent.params.items()},
        **{f"score.{key}": value for key, value in (entry.get("score_weights") or {}).items()},
        "rescored_runs": ", ".join(Path(source).parent.name for source in entry.get("sources", [])),
    }
    return TrackedRun(
        directory=results_dir,
        name=config,
        experiment=parent.experiment,
        identity=digest(params),
        params=params,
        metrics=results_metrics(entry, protocol_prefix(entry)),
        tags=common_tags("rescored configuration", results_dir, bool(entry.get("random_weights"))),
        artifacts=[results_dir / RESULTS_JSON],
        started=written_at(results_dir / RESULTS_JSON),
        ended=written_at(results_dir / RESULTS_JSON),
    )


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@TRACKING_URI_OPTION
@EXPERIMENT_OPTION
@fail_cleanly
def track(paths, tracking_uri, experiment):
    """Send existing directories to MLflow: run directories (train), sweeps, ablations and results
    directories (evaluate, baselines). A directory sent before updates its run; nothing is copied twice.

    What a command with --track could not send (a store that was not writable, a server that was
    down) is sent this way later.
    """
    tracking = Tracking(tracking_uri, experiment)
    failures = [path for path in paths if not tracking.send([path])]
    if failures:
        raise UserError(f"{len(failures)} of {len(paths)} directories were not tracked (see above)")
