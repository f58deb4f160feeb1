"""Sweeps, the training half: train every (configuration × seed) on one cache, in as few passes as
possible. Scoring the runs and the summary table are evaluate/sweep.py's.

A sweep is a set of named configurations (``TrainConfig`` overrides, e.g. the margin presets, or a
grid over ``--vary lr=...``), each trained once per seed. Runs that share every setting that
changes shapes or the loss's code path (``train.fit.group_key``) are trained together in one pass
(``fit_runs``: one stacked model, one optimizer step for all of them); other settings split the
sweep into passes, which ``jobs`` worker processes run in parallel.

``OUT/<configuration>-seed<k>/`` holds each run (as ``train --out``) plus ``metrics.json``, written
last: a run directory with ``metrics.json`` is finished, and a re-run reuses it only if it was
trained with the same config, on a cache with the same fingerprint, and held out the same images
(anything else is refused with the difference named). A pass writes its runs when it ends: a sweep
killed mid-pass keeps every finished run and retrains the runs of the unfinished pass.
"""

from __future__ import annotations

import resource
from collections import defaultdict
from pathlib import Path

from joblib import Parallel, delayed

from raml.cache import FeatureTable, mismatched_fields
from raml.cache.files import make_dirs, read_json_checked
from raml.errors import UserError
from raml.train.config import TrainConfig, make_config
from raml.train.fit import GROUP_FIELDS, fit_runs, group_key, write_json, write_run, write_run_files
from raml.train.split import holdout_split

METRICS_FILE = "metrics.json"


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_name(configuration: str, seed: int) -> str:
    return f"{configuration}-seed{seed}"


def grid_configurations(margins, vary: dict | None = None, **common) -> dict[str, dict]:
    """Named configurations: every margin preset × every combination of the ``vary`` values.

    ``grid_configurations(["adaptive", "fixed"], {"lr": [1e-4, 5e-5]}, epochs=5)`` gives
    ``adaptive-lr0.0001``, ``adaptive-lr5e-05``, ``fixed-lr0.0001``, ``fixed-lr5e-05``, each a dict of
    ``TrainConfig`` overrides (seed excluded). Without ``vary`` the names are the margins.
    """
    combinations = [{}]
    for field_name, values in (vary or {}).items():
        combinations = [{**combination, field_name: value} for combination in combinations for value in values]
    configurations = {}
    for margin in margins:
        for combination in combinations:
            name = "-".join([margin, *(f"{key}{value}" for key, value in combination.items())])
            configurations[name] = {**common, **combination, "margin": margin}
    return configurations


def build_configs(configurations: dict[str, dict], seeds) -> dict[str, tuple[str, TrainConfig]]:
    """run name → (configuration name, its ``TrainConfig`` for that seed)."""
    runs = {}
    for name, overrides in configurations.items():
        overrides = dict(overrides)
        margin = overrides.pop("margin", "adaptive")
        for seed in seeds:
            runs[run_name(name, seed)] = (name, make_config(margin, **{**overrides, "seed": seed}))
    return runs


def finished_metrics(run_dir: Path, config: TrainConfig, table: FeatureTable, heldout_hash: str) -> dict | None:
    """The metrics of a finished run, or None when it has not finished.

    Refuses (``UserError``) a finished run trained with other settings, on a cache with another
    fingerprint (another backbone, weights — random ones included — or input size), or on other
    held-out images: its scores would be labelled as this sweep's.
    """
    if not (run_dir / METRICS_FILE).exists():
        return None
    metrics, stored = (_read_json_object(run_dir / name) for name in (METRICS_FILE, "config.json"))
    try:
        stored = TrainConfig.from_dict(stored).to_dict()
    except UserError as err:
        raise UserError(f"{run_dir / 'config.json'}: {err}") from None
    problems = [
        f"{key}={stored.get(key)!r} (now {value!r})"
        for key, value in config.to_dict().items()
        if stored.get(key) != value
    ]
    fingerprint = metrics.get("fingerprint")
    if not isinstance(fingerprint, dict):
        raise UserError(f"{run_dir / METRICS_FILE}: no cache fingerprint; delete the run directory to train it again")
    problems += [
        f"cache {key}={fingerprint.get(key)!r} (this cache: {table.meta.get(key)!r})"
        for key in mismatched_fields(fingerprint, table.meta)
    ]
    if metrics.get("heldout_hash") != heldout_hash:
        problems.append("held-out images differ (another split or another dataset)")
    if problems:
        raise UserError(
            f"{run_dir} was trained differently: {'; '.join(problems)}. Use another --out, or "
            "delete that run to retrain it."
        )
    return metrics


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``, or a ``UserError`` naming the file (a run's metrics and config)."""

    def not_an_object(value) -> str | None:
        return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"

    try:
        return read_json_checked(path, not_an_object, advice="; delete the run directory to train it again")
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err}); delete the run directory to train it again") from None


def train_pass(
    table: FeatureTable,
    runs: dict[str, TrainConfig],
    out_dir: Path,
    threads: int | None,
    device: str,
    on_epoch=None,
    compile: bool = False,
) -> dict[str, dict]:
    """Train ``runs`` (one group) in one pass, write each run directory, then its ``metrics.json``.
    ``on_epoch``: ``fit_runs``'s per-epoch hook; ``compile`` compiles the pass's step."""
    trained = fit_runs(table, list(runs.values()), threads=threads, device=device, on_epoch=on_epoch, compile=compile)
    metrics = {}
    for (name, config), head in zip(runs.items(), trained):
        run_dir = out_dir / name
        if head.diverged is None:
            write_run(run_dir, head)
        else:  # no checkpoint: what it was, where it diverged (metrics.json), so that a re-run does not retrain it
            write_run_files(run_dir, head)
        metrics[name] = {
            "run": name,
            "seed": config.seed,
            "margin": config.margin,
            "heldout_hash": head.split.manifest()["heldout_hash"],
            "heldout_images": int(len(head.split.heldout)),
            "fingerprint": {key: head.fingerprint.get(key) for key in head.fingerprint},
            "pass_seconds": sum(record["seconds"] for record in head.history),
            "runs_in_pass": head.runs_in_pass,
            "device": head.device,
            "peak_memory_mb": peak_memory_mb(),  # of the process that trained the pass
            **({"diverged": head.diverged} if head.diverged else {}),
        }
        write_json(run_dir / METRICS_FILE, metrics[name])
    return metrics


def plan_passes(runs: dict[str, TrainConfig]) -> list[dict[str, TrainConfig]]:
    """The runs grouped by ``group_key``: one pass per group, in the order first seen."""
    groups = defaultdict(dict)
    for name, config in runs.items():
        groups[group_key(config)][name] = config
    return list(groups.values())


def describe_pass(runs: dict[str, TrainConfig]) -> str:
    first = next(iter(runs.values()))
    shared = ", ".join(f"{name} {getattr(first, name)}" for name in GROUP_FIELDS)
    return f"{len(runs)} runs ({', '.join(runs)}); shared: {shared}"


def train_missing(
    table: FeatureTable,
    configurations: dict[str, dict],
    seeds,
    out_dir,
    jobs: int = 1,
    threads: int | None = 1,
    device: str = "cpu",
    progress=None,
    steps=None,
    compile: bool = False,
) -> tuple[dict, list, dict]:
    """Train the runs of ``configurations`` × ``seeds`` that are not finished in ``out_dir`` (see the
    module docstring). Returns ``(runs, passes, diverged)``: run name → (configuration,
    ``TrainConfig``), the names of the runs of each pass trained now, and run name →
    ``train.fit.divergence_record`` of the runs (now or before) that diverged: they have no checkpoint.

    ``configurations``: name → ``TrainConfig`` overrides (``grid_configurations`` builds them).
    ``jobs`` passes run in parallel worker processes of ``threads`` torch threads each. ``steps``
    (``cli.progress.Progress`` or None) counts the passes' epochs: each epoch as it ends with one job,
    each pass's epochs when it ends with several (worker processes report nothing before).
    ``compile`` compiles each pass's step (``train.step``).
    """
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    say = progress or (lambda line: None)
    runs = build_configs(configurations, seeds)
    split_hashes = {}
    finished, pending = {}, {}
    for name, (_, config) in runs.items():
        key = (config.split_seed, config.holdout_fraction)
        if key not in split_hashes:
            split_hashes[key] = holdout_split(table, *key).manifest()["heldout_hash"]
        metrics = finished_metrics(out_dir / name, config, table, split_hashes[key])
        if metrics is None:
            pending[name] = config
        else:
            finished[name] = metrics
    if finished:
        say(f"sweep: {len(finished)} of {len(runs)} runs already finished in {out_dir}; skipping them")
    passes = plan_passes(pending)
    for number, group in enumerate(passes, start=1):
        say(f"sweep: pass {number}/{len(passes)}: {describe_pass(group)}")
    epochs = [next(iter(group.values())).epochs for group in passes]
    counted = []  # epochs counted as they ended, in this process (one job)
    if steps:
        steps.begin("sweep training", sum(epochs), "epochs")

    def epoch_ended(records):
        counted.append(1)
        steps.advance()

    on_epoch = epoch_ended if steps and jobs == 1 else None
    tasks = (delayed(train_pass)(table, group, out_dir, threads, device, on_epoch, compile) for group in passes)
    for number, metrics in enumerate(Parallel(n_jobs=jobs, return_as="generator")(tasks), start=1):
        if steps:  # the epochs not counted yet: all of them from a worker, those a divergence skipped
            steps.advance(epochs[number - 1] - len(counted))
            counted.clear()
        finished.update(metrics)
        seconds = next(iter(metrics.values()))["pass_seconds"]
        say(
            f"sweep: pass {number}/{len(passes)} done: {len(metrics)} runs in {seconds:.1f} s of training "
            f"({len(finished)}/{len(runs)} runs finished)"
        )
    if steps:
        steps.end()
    diverged = {name: metrics["diverged"] for name, metrics in finished.items() if metrics.get("diverged")}
    return runs, [sorted(group) for group in passes], diverged
