"""Sweeps, the scoring half: ``run_sweep`` trains what is missing (train/sweep.py), then scores every
run exactly as ``evaluate`` does (``OUT/results/``: results.json, scores.csv) and writes
``OUT/summary.json`` and ``OUT/summary.md`` from those results: mean ± sample std (ddof = 1) over
seeds, with n, per configuration and per category, so that the sweep's table and ``evaluate``'s
are the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from raml.cache import FeatureTable
from raml.cache.files import atomic_write_text
from raml.errors import UserError
from raml.evaluate.file_names import SUMMARY_JSON
from raml.evaluate.results_file import diverged_cell
from raml.evaluate.run import evaluate_checkpoints
from raml.train.fit import write_json
from raml.train.sweep import train_missing

RESULTS_DIR = "results"


def run_sweep(
    table: FeatureTable,
    configurations: dict[str, dict],
    seeds,
    out_dir,
    jobs: int = 1,
    threads: int | None = 1,
    device: str = "cpu",
    progress=None,
    n_resamples: int = 1000,
    steps=None,
) -> dict:
    """Train the missing runs of ``configurations`` × ``seeds`` (``train.sweep.train_missing``), score
    them all with ``evaluate``'s code, write and return the summary. ``steps``
    (``cli.progress.Progress`` or None) shows both halves' progress."""
    out_dir = Path(out_dir)
    say = progress or (lambda line: None)
    runs, passes, diverged = train_missing(
        table, configurations, seeds, out_dir, jobs=jobs, threads=threads, device=device, progress=say, steps=steps
    )
    summary = summarise_runs(table, configurations, runs, diverged, out_dir, n_resamples, say, steps)
    summary["passes"] = passes
    write_json(out_dir / SUMMARY_JSON, summary)
    atomic_write_text(out_dir / "summary.md", summary_markdown(summary))
    return summary


def summarise_runs(
    table: FeatureTable,
    configurations: dict,
    runs: dict,
    diverged: dict,
    out_dir: Path,
    n_resamples: int,
    say,
    steps=None,
) -> dict:
    """Score every run that did not diverge with ``evaluate`` (holdout protocol) and condense its
    entries; a configuration lists its diverged runs (``train.fit.divergence_record``)."""
    by_configuration = {
        name: [{"run": run, **diverged[run]} for run, (config, _) in runs.items() if config == name and run in diverged]
        for name in configurations
    }
    run_dirs = [out_dir / name for name in runs if name not in diverged]
    if not run_dirs:
        raise UserError(
            f"every run of the sweep in {out_dir} diverged: nothing to score. "
            + next(iter(diverged.values()))["hint"].capitalize()
            + "."
        )
    _, entries = evaluate_checkpoints(
        run_dirs,
        table.cache_dir,
        out_dir / RESULTS_DIR,
        protocol="holdout",
        n_resamples=n_resamples,
        log=say,
        table=table,
        diverged=by_configuration,
        steps=steps,
    )
    first = next(iter(entries.values()))
    configurations_summary = {}
    for name in configurations:
        entry = entries.get(name, {"seeds": [], "auroc_over_seeds": None, "categories": {}})
        configurations_summary[name] = {
            "seeds": entry["seeds"],
            "mean_auroc": entry["auroc_over_seeds"],
            "categories": {c: stats["auroc_over_seeds"] for c, stats in entry["categories"].items()},
            "anomalous_inside_margin": entry.get("anomalous_inside_margin"),
            "config": {key: value for key, value in entry.get("config", {}).items() if key != "seed"},
            "diverged": by_configuration[name],
        }
    return {
        "metric": "held-out image AUROC of s_final, % (mean over categories per run); mean ± sample std "
        "(ddof = 1) over seeds, n seeds",
        "cache_dir": str(table.cache_dir),
        "backbone": first["backbone"],
        "weights": first["weights"],
        "random_weights": first["random_weights"],
        "heldout_hash": first["protocol"]["image_list_hash"],
        "heldout_images": first["protocol"]["n_images"],
        "results": str(out_dir / RESULTS_DIR),
        "configurations": configurations_summary,
    }


def _cell(stats: dict | None) -> str:
    if not stats or stats["mean"] is None:
        return "–"
    std = f" ± {stats['std']:.2f}" if stats["std"] is not None else ""
    return f"{stats['mean']:.2f}{std} (n={stats['n']})"


def summary_markdown(summary: dict) -> str:
    """The summary as two Markdown tables (AUROC in %, mean ± sample std over seeds, n)."""
    names = list(summary["configurations"])
    lines = [
        f"# Sweep: {summary['metric']}",
        "",
        f"Cache `{summary['cache_dir']}` (backbone {summary['backbone']}, weights {summary['weights']}), "
        f"holdout protocol, {summary['heldout_images']} held-out images "
        f"(hash {summary['heldout_hash'][:12]}). Per-image scores and CIs: `{summary['results']}`.",
        "",
    ]
    if summary["random_weights"]:
        lines += ["**These features come from random weights: the numbers below are meaningless.**", ""]
    lines += ["| configuration | seeds | AUROC % | anomalous inside margin | diverged |", "|---|---|---|---|---|"]
    for name, entry in summary["configurations"].items():
        inside = entry.get("anomalous_inside_margin")
        lines.append(
            f"| {name} | {len(entry['seeds'])} | {_cell(entry['mean_auroc'])} | "
            f"{'–' if inside is None else f'{inside:.2f}'} | {diverged_cell(entry.get('diverged'))} |"
        )
    categories = sorted({c for entry in summary["configurations"].values() for c in entry["categories"]})
    lines += ["", "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for category in categories:
        cells = [_cell(summary["configurations"][name]["categories"].get(category)) for name in names]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
