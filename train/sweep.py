"""Margin ablations: train every (margin × seed) on one cache and tabulate held-out image AUROC.

``OUT/<margin>-seed<k>/`` holds each run (as ``train --out``) plus ``metrics.json``, written
last: a run directory with ``metrics.json`` is finished and a re-run skips it, so an interrupted
sweep resumes. All runs share the split seed, hence the same held-out images (checked through
the manifests' hashes). ``OUT/summary.json`` and ``OUT/summary.md`` give mean ± sample std over
seeds of each configuration's held-out AUROC (mean over categories, as the original release
reports it) and of each category's.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from cache import FeatureTable, UserError
from evaluate.metrics import image_auroc
from train.config import TrainConfig, make_config
from train.fit import fit, torch_threads, write_json, write_run
from train.infer import score_rows

METRICS_FILE = "metrics.json"


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_name(margin: str, seed: int) -> str:
    return f"{margin}-seed{seed}"


def heldout_metrics(model, table: FeatureTable, split, config: TrainConfig) -> dict:
    """Held-out image AUROC of s_final per category and their mean (categories whose held-out
    images are all of one class have no AUROC and are listed under ``skipped``)."""
    scores = score_rows(model, table, split.heldout, config.visual_weight, config.text_weight)["final"]
    labels, categories = table.label[split.heldout], table.category[split.heldout]
    per_category, skipped = {}, []
    for category in sorted(set(categories.tolist())):
        here = categories == category
        if len(np.unique(labels[here])) < 2:
            skipped.append(category)
            continue
        per_category[category] = image_auroc(labels[here], scores[here])
    return {"mean_auroc": float(np.mean(list(per_category.values()))) if per_category else None,
            "categories": per_category, "skipped": skipped, "heldout_images": int(len(split.heldout)),
            "heldout_hash": split.manifest()["heldout_hash"]}


def train_and_evaluate(table: FeatureTable, config: TrainConfig, run_dir, threads: int | None = 1) -> dict:
    """One sweep run: train, write the run directory, then its ``metrics.json``."""
    trained = fit(table, config, threads=threads)
    write_run(run_dir, trained)
    with torch_threads(threads):
        heldout = heldout_metrics(trained.model, table, trained.split, config)
    metrics = {"run": Path(run_dir).name, "margin": config.margin, "seed": config.seed, **heldout,
               "train_seconds": sum(record["seconds"] for record in trained.history),
               "peak_memory_mb": peak_memory_mb()}  # of the process that trained it
    write_json(Path(run_dir) / METRICS_FILE, metrics)
    return metrics


def finished_metrics(run_dir: Path, config: TrainConfig) -> dict | None:
    """The metrics of a finished run, or None; refuses a finished run of another configuration."""
    if not (run_dir / METRICS_FILE).exists():
        return None
    stored = json.loads((run_dir / "config.json").read_text())
    changed = sorted(key for key, value in config.to_dict().items() if stored.get(key) != value)
    if changed:
        details = ", ".join(f"{key}={stored.get(key)!r} (now {getattr(config, key)!r})" for key in changed)
        raise UserError(f"{run_dir} was trained with other settings: {details}. "
                         "Use another --out, or delete that run to retrain it.")
    return json.loads((run_dir / METRICS_FILE).read_text())


def run_sweep(table: FeatureTable, margins, seeds, out_dir, jobs: int = 1, threads: int | None = 1, progress=None,
              **overrides) -> dict:
    """Train the missing (margin × seed) runs in ``jobs`` worker processes of ``threads`` torch
    threads each; write and return the summary.

    ``overrides`` are ``TrainConfig`` fields applied to every run (e.g. ``epochs=5``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = {(margin, seed): make_config(margin, **{**overrides, "seed": seed})
               for margin in margins for seed in seeds}
    results, pending = {}, []
    for key, config in configs.items():
        metrics = finished_metrics(out_dir / run_name(*key), config)
        if metrics is None:
            pending.append(key)
        else:
            results[key] = metrics
    if progress and results:
        progress(f"sweep: {len(results)} of {len(configs)} runs already finished in {out_dir}; skipping them")
    tasks = (delayed(train_and_evaluate)(table, configs[key], out_dir / run_name(*key), threads) for key in pending)
    for key, metrics in zip(pending, Parallel(n_jobs=jobs, return_as="generator")(tasks)):
        results[key] = metrics
        if progress:
            progress(f"sweep: {run_name(*key)} done ({len(results)}/{len(configs)}), "
                     f"{metrics['train_seconds']:.1f} s of training")
    summary = summarise(results, margins, seeds, table)
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    return summary


def _mean_std(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def summarise(results: dict, margins, seeds, table: FeatureTable) -> dict:
    """Mean ± sample std over seeds, per configuration and per category."""
    hashes = {metrics["heldout_hash"] for metrics in results.values()}
    if len(hashes) > 1:
        raise UserError("the runs of this sweep were scored on different held-out images "
                         f"({len(hashes)} different heldout hashes); they cannot share a table")
    configurations = {}
    for margin in margins:
        runs = [results[(margin, seed)] for seed in seeds]
        categories = sorted({c for run in runs for c in run["categories"]})
        configurations[margin] = {
            "seeds": list(seeds),
            "mean_auroc": _mean_std([run["mean_auroc"] for run in runs]),
            "categories": {c: _mean_std([run["categories"].get(c) for run in runs]) for c in categories},
        }
    return {"metric": "held-out image AUROC of s_final (fraction; mean over categories per run)",
            "cache_dir": str(table.cache_dir), "backbone": table.meta.get("backbone"),
            "random_weights": bool(table.meta.get("random_weights")), "protocol": "holdout",
            "heldout_hash": hashes.pop() if hashes else None, "configurations": configurations}


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "–"
    std = f" ± {100 * stats['std']:.2f}" if stats["std"] is not None else ""
    return f"{100 * stats['mean']:.2f}{std}"


def summary_markdown(summary: dict) -> str:
    """The summary as two Markdown tables (AUROC in %, mean ± sample std over seeds)."""
    margins = list(summary["configurations"])
    lines = [f"# Margin sweep: {summary['metric']}", "",
             f"Cache `{summary['cache_dir']}` (backbone {summary['backbone']}), holdout protocol, "
             f"held-out images {summary['heldout_hash'][:12] if summary['heldout_hash'] else '–'}.", ""]
    if summary["random_weights"]:
        lines += ["**These features come from random weights: the numbers below are meaningless.**", ""]
    lines += ["| configuration | seeds | AUROC % |", "|---|---|---|"]
    for margin, entry in summary["configurations"].items():
        lines.append(f"| {margin} | {len(entry['seeds'])} | {_cell(entry['mean_auroc'])} |")
    categories = sorted({c for entry in summary["configurations"].values() for c in entry["categories"]})
    lines += ["", "| category | " + " | ".join(margins) + " |", "|---|" + "---|" * len(margins)]
    for category in categories:
        cells = [_cell(summary["configurations"][m]["categories"].get(category, {"mean": None})) for m in margins]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
