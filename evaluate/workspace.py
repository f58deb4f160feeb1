"""The evaluation commands' side of the workspace (``cache.workspace`` holds its layout): which
run, cache and directory ``evaluate``, ``sweep``, ``predict`` and ``export`` take when none is
named, and ``status``, the workspace on one screen with what to run next.

``status`` reads only small files: each cache's metadata (``read_cache(..., with_features=False)``:
no features), each run's ``config.json``, each ``results.json``; a cache or results file that
cannot be read is listed with the reason instead of stopping the command. Nothing here imports
torch or scikit-learn (the command line imports this module to start, and status stays quick).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raml.cache import mismatched_fields, read_cache
from raml.cache.format import read_fingerprint
from raml.cli.config_file import config_path
from raml.cli.options import echo_chosen
from raml.cli.workspace import (
    FEATURES,
    LATEST,
    REPORT_DIR,
    RESULTS,
    RUNS,
    caches_of,
    claim_run_dir,
    datasets_home,
    default_dataset_root,
    describe_cache,
    newest_run,
    run_entries,
    unfinished_run,
)
from raml.errors import UserError
from raml.evaluate.file_names import RESULTS_JSON, SUMMARY_JSON
from raml.extract.datasets import LAYOUTS, READERS
from raml.train.checkpoint import CHECKPOINT_FILE, load_checkpoint

SHOWN = 8  # rows per section of status; older ones are counted, not listed


def run_finished(path: Path) -> bool:
    """A training run is finished once its checkpoint is written (``write_run`` writes it last), a
    sweep once its summary is (after every run was trained and scored)."""
    return (path / CHECKPOINT_FILE).is_file() or (path / SUMMARY_JSON).is_file()


def newest_run_dir(*, sweeps: bool) -> Path:
    """The workspace's newest finished run (``cache.workspace.newest_run``), printed; with
    ``sweeps`` a sweep counts as one run (all its seeds)."""
    entry = newest_run(run_finished, sweeps=sweeps)
    if entry is None:
        raise UserError(
            "no finished training run under ./runs/: train one with raml train, or pass --checkpoint RUN_DIR"
        )
    return echo_chosen("run", entry.path, "the newest" + (" (a sweep: all its runs)" if entry.is_sweep else ""))


def run_label(paths) -> str:
    """A name for results made from these runs: the run directories' names (``runs/mvtec/latest``
    is the run it points to)."""
    names = [(path.parent if path.is_file() else path.resolve()).name for path in map(Path, paths)]
    return "+".join(names)


def scoring_cache(checkpoints, dataset: str | None) -> Path:
    """The workspace's cache of ``dataset`` (default: the one the first run was trained on) whose
    backbone is the runs' (same fingerprint fields), printed; none or several is an error that lists
    the dataset's caches and says how to choose."""
    from raml.evaluate.run import find_checkpoints

    checkpoint = load_checkpoint(find_checkpoints(checkpoints)[0])
    fingerprint = checkpoint.fingerprint
    dataset = dataset or (fingerprint.get("dataset") or {}).get("kind")
    if dataset is None:
        raise UserError(
            f"{checkpoint.path} does not record the dataset it was trained on: pass --dataset or --cache-dir"
        )
    caches = caches_of(dataset)
    fits = [path for path in caches if not mismatched_fields(fingerprint, read_fingerprint(path))]
    if len(fits) == 1:
        return echo_chosen("cache", fits[0])
    listed = "".join(f"\n  {path}   {describe_cache(path)}" for path in (fits or caches))
    backbone = f"{fingerprint.get('backbone')}, weights {fingerprint.get('weights')}, {fingerprint.get('precision')}"
    if fits:
        raise UserError(
            f"{len(fits)} caches of {dataset} fit the backbone of {checkpoint.path} ({backbone}):{listed}\n"
            "Pick one with --cache-dir PATH."
        )
    raise UserError(
        f"no cache of {dataset} under {FEATURES / dataset}/ has the backbone of {checkpoint.path} "
        f"({backbone}); extract one with {extract_command(fingerprint, dataset)}, or pass --cache-dir."
        + (f" The caches of {dataset} (other backbones):{listed}" if caches else "")
    )


def extract_command(fingerprint: dict, dataset: str) -> str:
    """The ``extract`` command line that gives ``dataset`` a cache of the backbone ``fingerprint`` names."""
    source = fingerprint.get("backbone_source") or {}
    words = [
        "raml extract --dataset",
        dataset,
        "--model",
        str(source.get("model") or fingerprint.get("backbone")),
    ]
    if fingerprint.get("random_weights"):
        words.append("--random-weights")
    elif source.get("weights_file"):
        words += ["--weights", source["weights_file"]]
    else:
        words += ["--pretrained", str(fingerprint.get("weights"))]
    precision = fingerprint.get("precision")
    if precision not in (None, "fp32"):  # the first engine that writes that precision
        from raml.extract.engines import PRECISIONS

        words += ["--engine", next((e for e, p in PRECISIONS.items() if p == precision), "auto")]
    return " ".join(words)


def sweep_dir(dataset: str, name: str) -> Path:
    """``runs/<dataset>/NNN-<name>``: the newest sweep of that name if it did not finish (so that
    re-running the command resumes it), else a new one. Printed."""
    unfinished = unfinished_run(dataset, name, run_finished)
    if unfinished is not None:
        return echo_chosen("run", unfinished, "an unfinished sweep of these margins: resuming it")
    return echo_chosen("run", claim_run_dir(dataset, name))


def status_lines() -> list[str]:
    """The lines of ``status``."""
    config = config_path()
    lines = [f"workspace {Path.cwd()}  (defaults: {config if config else 'no raml.toml'})"]
    found = [kind for kind in LAYOUTS if default_dataset_root(kind).is_dir()]
    lines.append(f"datasets ({datasets_home()}/<dataset>; textile ships with conformal-clip-data):")
    lines += [f"  {kind:<8} {default_dataset_root(kind)}" for kind in found] or ["  none"]
    caches = {kind: caches_of(kind) for kind in _subdirs(FEATURES)}
    lines.append(f"caches ({FEATURES}/<dataset>/<backbone>):")
    lines += [f"  {path}   {_cache_line(path)}" for paths in caches.values() for path in paths] or ["  none"]
    entries = run_entries()
    lines.append(f"runs ({RUNS}/<dataset>/NNN-<name>):")
    lines += _newest([f"  {entry.path}   {_run_line(entry)}" for entry in entries])
    results = sorted(RESULTS.rglob(RESULTS_JSON), key=lambda path: path.stat().st_mtime) if RESULTS.is_dir() else []
    lines.append(f"results ({RESULTS}/):")
    lines += _newest([f"  {path.parent}   {_results_line(path)}" for path in results])
    lines.append("next:")
    lines += [f"  {step}" for step in _next_steps(found, caches, entries, results)]
    return lines


def _subdirs(path: Path) -> list[str]:
    return sorted(child.name for child in path.iterdir() if child.is_dir()) if path.is_dir() else []


def _newest(rows: list[str]) -> list[str]:
    if not rows:
        return ["  none"]
    return ([f"  ... {len(rows) - SHOWN} older"] if len(rows) > SHOWN else []) + rows[-SHOWN:]


def _cache_line(path: Path) -> str:
    try:
        table = read_cache(path, with_features=False)
    except UserError as err:
        return f"unreadable: {err}"
    meta = table.meta
    size = sum(file.stat().st_size for file in path.iterdir() if file.is_file())
    return f"{len(table)} images, {len(table.categories)} categories; {describe_cache(path)}; {size / 1e6:.1f} MB" + (
        "; RANDOM WEIGHTS" if meta["random_weights"] else ""
    )


def _run_line(entry) -> str:
    latest = entry.path.parent / LATEST
    mark = "   <- latest" if latest.is_symlink() and latest.resolve() == entry.path.resolve() else ""
    if not run_finished(entry.path):
        return "unfinished (still running, or stopped: a sweep resumes when run again)" + mark
    if entry.is_sweep:
        what, written = f"sweep of {len(list(entry.path.glob(f'*/{CHECKPOINT_FILE}')))} runs", entry.path
    else:
        config = json.loads((entry.path / "config.json").read_text())
        what = f"margin {config['margin']}, seed {config['seed']}, {config['epochs']} epochs"
        written = entry.path / CHECKPOINT_FILE
    return f"{what}; {time.strftime('%Y-%m-%d %H:%M', time.localtime(written.stat().st_mtime))}{mark}"


def _results_line(path: Path) -> str:
    try:
        entries = json.loads(path.read_text())
        parts = [
            f"{name}: {entry['protocol']['name']} on {(entry['protocol'].get('dataset') or {}).get('kind', '?')}, "
            f"AUROC {entry['mean_auroc']:.1f} %"
            for name, entry in entries.items()
        ]
        random = any(entry.get("random_weights") for entry in entries.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return "; ".join(parts) + (" (random weights: not meaningful)" if random else "")


def _next_steps(datasets, caches, entries, results) -> list[str]:
    """A few commands that take the workspace one step further, in pipeline order."""
    if not datasets and not any(caches.values()):
        return [
            f"put a dataset under {datasets_home()}/<dataset> (mvtec, visa or folder; README: Datasets), "
            "or set RAML_DATA"
        ]
    steps = [f"raml extract --dataset {kind}" for kind in datasets if not caches.get(kind)]
    cached = [kind for kind, paths in caches.items() if paths and kind in READERS]  # --dataset takes these
    finished = [entry for entry in entries if run_finished(entry.path)]
    if not finished:
        return steps + [f"raml train --dataset {(cached or datasets)[0]}"]
    newest = finished[-1]
    scored = {(path.parent.parent.name, path.parent.name) for path in results}
    for kind in [newest.dataset] + [kind for kind in cached if kind != newest.dataset]:
        if (kind, newest.path.name) not in scored:
            steps.append("raml evaluate" + ("" if kind == newest.dataset else f" --dataset {kind}"))
    report = REPORT_DIR / "report.md"
    if results and (not report.is_file() or report.stat().st_mtime < max(p.stat().st_mtime for p in results)):
        steps.append("raml report")
    return steps or ["nothing missing: train another configuration (raml sweep) or predict new images"]
