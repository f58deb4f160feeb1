"""Experiment tracking with MLflow: the ``--track`` options, and the writer that sends what a run
directory holds to an MLflow store.

Off by default. ``--track`` (or ``track = true`` in raml.toml) sends each run, sweep, ablation and
results directory to the workspace's SQLite store, ``./mlflow.db`` (artifacts under ``./mlruns/``:
MLflow's own default names, so ``mlflow ui`` started in the workspace shows them);
``--tracking-uri`` names another store or a tracking server. What is sent is described by
cli/tracked_runs.py (``TrackedRun``s read from the files); this module only writes them.

The run directory stays the source of truth: commands write their files first and track them
afterwards; a store that cannot be written costs no result, only one line that says what was not
tracked and the ``raml track`` command that sends it later. Each directory keeps its MLflow run id
in ``tracking.json`` (per store), so sending it again updates that run instead of adding a copy; a
directory whose training changed since (another ``identity``) gets a new run.

MLflow (the optional extra ``raml[track]``) is imported only when something is tracked.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from raml.cli.options import CheckedText, given_on_command_line, with_options
from raml.errors import UserError

TRACKING_FILE = "tracking.json"  # in a tracked directory: {store URI: {"run_id", "identity", "complete"}}
DEFAULT_STORE = "mlflow.db"  # in the working directory (the workspace): MLflow's own default name
ARTIFACTS_DIR = "mlruns"  # beside the SQLite store: MLflow's default artifact root
EXPERIMENT_KIND = "mlflow.experimentKind"  # "custom_model_development": mlflow ui opens on the runs table, not GenAI's
INSTALL_HINT = "pip install 'raml[track]' (MLflow; 'raml[track-ui]' adds mlflow ui)"
_BAD_KEY_CHARACTERS = re.compile(r"[^\w.\- /:]")  # what MLflow refuses in metric and param names
# A server that is down must not hold a finished command for minutes (MLflow retries 7 times by default).
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def metric_key(text: str) -> str:
    """``text`` as an MLflow metric or param name (``scales-1,2`` → ``scales-1_2``)."""
    return _BAD_KEY_CHARACTERS.sub("_", text)


def default_tracking_uri() -> str:
    """``sqlite:///<working directory>/mlflow.db``: the workspace's embedded store."""
    return f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


@dataclass
class TrackedRun:
    """One MLflow run, as read from a directory RAML wrote (cli/tracked_runs.py builds them)."""

    directory: Path  # where tracking.json keeps the run's MLflow id
    name: str
    experiment: str  # the experiment a new run goes to (unless --experiment names one)
    identity: str  # what the run was trained or computed from: another identity is another run
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # results, logged at step 0 (sent again: replaced)
    series: dict = field(default_factory=dict)  # per-epoch curves: key → [(epoch, value)], logged once
    tags: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)  # files
    failed: bool = False  # MLflow status FAILED (a diverged run)
    children: list = field(default_factory=list)
    started: int | None = None  # when the work began and ended (ms since the epoch; None: now), from the files
    ended: int | None = None


@dataclass
class Tracking:
    """Where tracked runs go: ``uri`` (None: the workspace's SQLite store) and ``experiment``
    (None: each run's own, ``raml-<dataset>``)."""

    uri: str | None = None
    experiment: str | None = None

    def send(self, paths, say=click.echo, **describe_options) -> bool:
        """Track the directories ``paths`` (``tracked_runs.describe``); on any failure say in one line
        what was not tracked and how to send it later, and return False. Never raises (but for an
        interrupt): the files are written already."""
        from raml.cli.tracked_runs import describe

        paths = [Path(path) for path in paths]
        try:
            runs = [run for path in paths for run in describe(path, **describe_options)]  # the files first
            writer = Writer(self.uri, self.experiment)
            for run in runs:
                writer.log(run)
        except Exception as err:  # noqa: BLE001  (whatever MLflow, SQLite or the network raise: the result is safe)
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            later = " ".join(str(path) for path in paths) + (f" --tracking-uri {self.uri}" if self.uri else "")
            say(f"tracking: not tracked ({type(err).__name__}: {reason}); send it later: raml track {later}")
            return False
        say(f"tracking: {', '.join(map(str, paths))} → {writer.uri}")
        return True


TRACKING_URI_OPTION = click.option(
    "--tracking-uri",
    type=CheckedText(
        lambda text: re.match(r"[A-Za-z][A-Za-z0-9+.-]*:\S", text) is not None,
        "an MLflow tracking URI with its scheme (sqlite:///path/mlflow.db, http://host:port, ...)",
    ),
    default=None,
    metavar="URI",
    help="MLflow store or server, e.g. http://127.0.0.1:5000 (on a command that trains or scores: implies "
    f"--track). Default: sqlite:///./{DEFAULT_STORE} in the workspace (mlflow ui there shows it).",
)
EXPERIMENT_OPTION = click.option(
    "--experiment",
    type=CheckedText(lambda text: bool(text.strip()), "an experiment name"),
    default=None,
    help="MLflow experiment of new runs. Default: raml-<dataset>.",
)


def tracking_options(func):
    """--track, --tracking-uri and --experiment; the command receives ``tracking``: a ``Tracking``,
    or None when tracking is off."""

    @functools.wraps(func)
    def with_tracking(*args, track, tracking_uri, experiment, **options):
        on = track or given_on_command_line("tracking_uri")  # naming a store on the command line means: use it
        return func(*args, tracking=Tracking(tracking_uri, experiment) if on else None, **options)

    return with_options(
        [
            click.option(
                "--track/--no-track",
                default=False,
                show_default=True,
                help="Send the run's parameters, curves, results and files to MLflow (needs "
                f"{INSTALL_HINT}); raml.toml: track = true.",
            ),
            TRACKING_URI_OPTION,
            EXPERIMENT_OPTION,
        ]
    )(with_tracking)


def _import_mlflow():
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports leave this machine
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        raise UserError(f"tracking needs MLflow: {INSTALL_HINT}") from None
    for logger in ("mlflow", "alembic"):  # the store's schema set-up logs at INFO on first use
        logging.getLogger(logger).setLevel(logging.WARNING)
    return MlflowClient


class Writer:
    """Writes ``TrackedRun``s to one MLflow store (see the module docstring)."""

    def __init__(self, uri: str | None = None, experiment: str | None = None):
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.client = _import_mlflow()(tracking_uri=self.uri)
        self.experiment_ids = {}

    def log(self, run: TrackedRun, parent_id: str | None = None) -> str:
        """Create or update ``run`` (and its children under it); returns its MLflow run id."""
        from mlflow.entities import Metric, Param, RunTag

        run_id, complete = self._existing(run)
        if run_id is None:
            tags = {"mlflow.runName": run.name, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            run_id = self.client.create_run(
                self._experiment_id(run.experiment), start_time=run.started, tags=tags
            ).info.run_id
            self._remember(run, run_id, complete=False)
        elif parent_id:
            self.client.set_tag(run_id, "mlflow.parentRunId", parent_id)
        stored = self.client.get_run(run_id).data.params
        params = [Param(metric_key(k), str(v)) for k, v in run.params.items() if metric_key(k) not in stored]
        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(k), float(v), now, 0) for k, v in run.metrics.items()]
        if not complete:  # the curves of one identity never change: sent once
            metrics += [Metric(metric_key(k), float(v), now, int(s)) for k, p in run.series.items() for s, v in p]
        tags = [RunTag(k, str(v)) for k, v in run.tags.items()]
        for start in range(0, len(params), 100):  # MLflow's limits per batch: 100 params or tags, 1000 metrics
            self.client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(tags), 100):
            self.client.log_batch(run_id, tags=tags[start : start + 100])
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
        for path in run.artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FAILED" if run.failed else "FINISHED", end_time=run.ended)
        self._remember(run, run_id, complete=True)
        for child in run.children:
            self.log(child, parent_id=run_id)
        return run_id

    def _existing(self, run: TrackedRun) -> tuple[str | None, bool]:
        """The MLflow run this directory was sent to before (same store, same identity, not deleted),
        and whether it was sent in full; (None, False) otherwise."""
        from mlflow.exceptions import MlflowException

        entry = _read_tracking_file(run.directory).get(self.uri) or {}
        if not entry.get("run_id") or entry.get("identity") != run.identity:
            return None, False
        try:
            found = self.client.get_run(entry["run_id"])
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # another database at this URI
                return None, False
            raise
        if found.info.lifecycle_stage == "deleted":
            return None, False
        return entry["run_id"], bool(entry.get("complete"))

    def _remember(self, run: TrackedRun, run_id: str, complete: bool) -> None:
        from raml.cache.files import atomic_write_text

        record = _read_tracking_file(run.directory)
        record[self.uri] = {"run_id": run_id, "identity": run.identity, "complete": complete}
        atomic_write_text(run.directory / TRACKING_FILE, json.dumps(record, indent=2))

    def _experiment_id(self, default_name: str) -> str:
        name = self.experiment or default_name
        if name not in self.experiment_ids:
            found = self.client.get_experiment_by_name(name)
            if found is not None and found.lifecycle_stage == "deleted":
                raise UserError(
                    f"MLflow experiment {name!r} was deleted: restore it (mlflow experiments restore "
                    f"--experiment-id {found.experiment_id}) or name another with --experiment"
                )
            if found is None:
                self.experiment_ids[name] = self.client.create_experiment(
                    name, **self._artifact_location(name), tags={EXPERIMENT_KIND: "custom_model_development"}
                )
            else:
                self.experiment_ids[name] = found.experiment_id
        return self.experiment_ids[name]

    def _artifact_location(self, name: str) -> dict:
        """Beside a SQLite store: its ``mlruns/<experiment>/`` (MLflow would pick the working
        directory's); a server chooses its own."""
        if not self.uri.startswith("sqlite:///"):
            return {}
        store = Path(self.uri.removeprefix("sqlite:///"))
        return {"artifact_location": (store.parent / ARTIFACTS_DIR / metric_key(name)).resolve().as_uri()}


def _read_tracking_file(directory: Path) -> dict:
    """A directory's ``tracking.json`` (``{}`` when there is none, or it is not one RAML wrote)."""
    try:
        record = json.loads((Path(directory) / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
