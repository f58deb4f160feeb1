"""``ablate``: what each part of the method adds, and whether the head beats simple probes trained
on the same cached features, in one command and one table.

Every configuration is the method's default with one thing changed (``ABLATIONS``), trained over
the given seeds by ``sweep`` (runs that share their shapes share a batched pass), and every
baseline (``evaluate/baselines/features.py``) is scored on the same held-out images. The table's
rows, sorted by held-out image AUROC, give the mean ± sample std over seeds (n), the bootstrap CI
of the category-mean AUROC, AP, F1-max, and the difference from the full method with a paired
bootstrap CI: the same resampled images for both rows, so a row against itself differs by exactly 0.

Configurations that change only how the image is scored (``RESCORED``) are not trained again: the
same seeds would give the full method's weights, so its checkpoints are scored another way:
``visual-score-only`` without s_text, ``map-fused`` with the pixel head's anomaly map in the image
score (``train.infer.fused_score``), which shows whether localisation helps detection. Rows that
cannot be made on this cache are left out with a note: ``map-fused`` when the full method's runs
have no pixel head (a cache without patch tokens, or without masks), ``knn-patches`` without
patch tokens.

Layout of ``OUT``: ``runs/`` (the sweep: one directory per run, ``results/``, ``summary.md``),
``rescored/<name>/`` (the full method's runs scored another way), ``baselines/<name>/`` (results
files), ``ablation.json``, ``ablation.md`` and ``ablation.png``.
Re-running resumes: finished runs are reused (``sweep``'s checks), baselines are rescored (seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raml.cache import FeatureTable
from raml.cache.files import atomic_write_text
from raml.cache.tokens import add_tokens_command
from raml.errors import UserError
from raml.evaluate.baselines.features import BASELINES, TOKEN_BASELINES, run_feature_baseline
from raml.evaluate.bootstrap_settings import CI_LEVEL, DEFAULT_BOOTSTRAP
from raml.evaluate.metrics import bootstrap_mean_auroc_ci, paired_bootstrap_auroc_difference
from raml.evaluate.plots import difference_forest
from raml.evaluate.results import NOT_MEANINGFUL, RESULTS_JSON, SCORES_CSV, read_scores_csv
from raml.evaluate.results_file import diverged_cell, read_results
from raml.evaluate.run import evaluate_checkpoints
from raml.evaluate.sweep import RESULTS_DIR, run_sweep
from raml.train.checkpoint import load_checkpoint
from raml.train.sweep import run_name

REFERENCE = "full"
# name → the TrainConfig fields it changes; everything else is the method's default.
ABLATIONS = {
    REFERENCE: {},
    "scales-1": {"scales": "1", "cross_attention": False},  # the global crop alone: nothing to attend across
    "scales-1,2": {"scales": "1,2"},
    "no-cross-attention": {"cross_attention": False},
    "no-text-fusion": {"text_fusion": False},
    "tile-pool-mean": {"tile_pool": "mean"},
    "visual-score-only": {"visual_weight": 1.0, "text_weight": 0.0},  # s_final without the zero-shot s_text
    "map-fused": {"map_weight": 0.5},  # 0.5·s_final + 0.5·the anomaly map's maximum
    "bce-only": {"loss": "bce"},
    "original-loss": {"loss_variant": "original"},
}
# Score weights are not used in training: these rows rescore the full method's runs (``evaluate_checkpoints``'s
# keyword arguments).
RESCORED = {"visual-score-only", "map-fused"}
NEEDS_PIXEL_HEAD = {"map-fused"}


def run_ablation(
    table: FeatureTable,
    out_dir,
    seeds,
    *,
    ablations=tuple(ABLATIONS),
    baselines=BASELINES,
    jobs: int = 1,
    threads: int | None = 1,
    device: str = "cpu",
    n_resamples: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    progress=None,
    steps=None,
    **common,
) -> dict:
    """Train every ablation over ``seeds``, score every baseline on the same held-out images, and
    write the table; returns it. ``common``: ``TrainConfig`` overrides applied to every
    configuration (e.g. ``epochs``). ``steps`` (``cli.progress.Progress`` or None) shows each
    phase's progress: training, scoring, the baselines."""
    unknown = [name for name in ablations if name not in ABLATIONS]
    if unknown:
        raise UserError(f"unknown ablation {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    if REFERENCE not in ablations:
        raise UserError(f"the ablations must include {REFERENCE!r}: every row is compared with it")
    say = progress or (lambda line: None)
    if not table.has_tokens.all() and set(baselines) & set(TOKEN_BASELINES):
        say(
            f"ablate: left out {', '.join(set(baselines) & set(TOKEN_BASELINES))}: the cache has no patch tokens for "
            f"every image (add them: {add_tokens_command(table.meta, table.cache_dir)})"
        )
        baselines = tuple(name for name in baselines if name not in TOKEN_BASELINES)
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    configurations = {name: {**common, **ABLATIONS[name]} for name in ablations if name not in RESCORED}
    summary = run_sweep(
        table,
        configurations,
        seeds,
        runs_dir,
        jobs=jobs,
        threads=threads,
        device=device,
        progress=say,
        n_resamples=n_resamples,
        steps=steps,
    )
    results = [runs_dir / RESULTS_DIR / RESULTS_JSON]
    diverged = {name: entry["diverged"] for name, entry in summary["configurations"].items() if entry["diverged"]}
    lost = {record["seed"] for record in diverged.get(REFERENCE, [])}
    reference_seeds = [seed for seed in seeds if seed not in lost]  # the rescored rows reuse these runs
    if not reference_seeds:
        raise UserError(
            f"every run of {REFERENCE!r} diverged ({diverged_cell(diverged[REFERENCE])}): there is "
            f"nothing to compare the other rows with. {diverged[REFERENCE][0]['hint'].capitalize()}."
        )
    for name in (name for name in ablations if name in RESCORED):
        if (
            name in NEEDS_PIXEL_HEAD
            and load_checkpoint(runs_dir / run_name(REFERENCE, reference_seeds[0])).model.pixel is None
        ):
            say(
                f"ablate: left out {name}: the runs of {REFERENCE} have no pixel head (it needs patch tokens and the "
                "masks of anomalous training images)"
            )
            continue
        path, _ = evaluate_checkpoints(
            [runs_dir / run_name(REFERENCE, seed) for seed in reference_seeds],
            table.cache_dir,
            out_dir / "rescored" / name,
            **ABLATIONS[name],
            name=name,
            n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed,
            log=say,
            table=table,
            device=device,
            steps=steps,
        )
        results.append(path)
    if steps:
        steps.begin("ablate baselines", len(baselines), "baselines")
    for name in baselines:
        say(f"ablate: baseline {name}")
        path, _, _ = run_feature_baseline(
            name,
            table,
            out_dir / "baselines" / name,
            split_from=runs_dir / run_name(REFERENCE, reference_seeds[0]),
            n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed,
        )
        results.append(path)
        if steps:
            steps.advance()
    if steps:
        steps.end()
    table_rows = ablation_rows(results, n_resamples, bootstrap_seed)
    ablation = {
        "reference": REFERENCE,
        "seeds": list(seeds),
        "heldout_images": summary["heldout_images"],
        "heldout_hash": summary["heldout_hash"],
        "backbone": summary["backbone"],
        "weights": summary["weights"],
        "random_weights": summary["random_weights"],
        "bootstrap": {
            "resamples": n_resamples,
            "seed": bootstrap_seed,
            "level": CI_LEVEL,
            "statistic": "mean over categories of the per-category image AUROC, %",
        },
        "rows": table_rows,
        "diverged": diverged,
    }
    atomic_write_text(out_dir / "ablation.json", json.dumps(ablation, indent=2))
    plot = difference_forest(ablation, out_dir / "ablation.png")
    atomic_write_text(out_dir / "ablation.md", ablation_markdown(ablation, plot.name))
    return ablation


def _scores_by_image(results_path: Path, config: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(relpaths sorted, categories, labels, final scores [runs, n]) of one configuration of a
    results file, from its scores.csv."""
    records = [r for r in read_scores_csv(results_path.parent / SCORES_CSV) if r["config"] == config]
    seeds = sorted({r["seed"] for r in records})
    relpaths = sorted({r["relpath"] for r in records})
    index = {relpath: i for i, relpath in enumerate(relpaths)}
    scores = np.full((len(seeds), len(relpaths)), np.nan)
    categories, labels = np.empty(len(relpaths), object), np.zeros(len(relpaths), int)
    for r in records:
        i = index[r["relpath"]]
        scores[seeds.index(r["seed"]), i] = float(r["final"])
        categories[i], labels[i] = r["category"], int(r["label"])
    return relpaths, categories, labels, scores


def ablation_rows(results_paths, n_resamples: int, bootstrap_seed: int) -> list[dict]:
    """One row per configuration of the results files, sorted by mean AUROC (best first)."""
    entries, scores = {}, {}
    for path in results_paths:
        for config, entry in read_results(path).items():
            entries[config] = entry
            scores[config] = _scores_by_image(Path(path), config)
    relpaths, categories, labels, reference = scores[REFERENCE]
    hashes = {entry["protocol"]["image_list_hash"] for entry in entries.values()}
    if len(hashes) > 1:
        raise UserError("the ablation's rows were scored on different held-out images; delete OUT and re-run")
    rows = []
    for config, entry in entries.items():
        if scores[config][0] != relpaths:
            raise UserError(f"{config} was scored on other images than {REFERENCE}")
        row_scores = scores[config][3]
        _, low, high = bootstrap_mean_auroc_ci(labels, row_scores, categories, n_resamples, bootstrap_seed)
        difference = paired_bootstrap_auroc_difference(
            labels, row_scores, reference, categories, n_resamples, bootstrap_seed
        )
        over_seeds = entry.get("auroc_over_seeds") or {"mean": entry["mean_auroc"], "std": None, "n": 1}
        rows.append(
            {
                "configuration": config,
                "method": entry.get("method", "?"),
                "auroc": over_seeds,
                "auroc_ci95": [round(100 * low, 2), round(100 * high, 2)],
                "average_precision": entry.get("mean_average_precision"),
                "f1_max": entry.get("mean_f1_max"),
                "difference": {
                    "value": round(100 * difference[0], 2),
                    "ci95": [round(100 * difference[1], 2), round(100 * difference[2], 2)],
                },
                "aupro": (entry.get("pixel") or {}).get("mean", {}).get("aupro", {}).get("mean"),
                "anomalous_inside_margin": entry.get("anomalous_inside_margin"),
            }
        )
    return sorted(rows, key=lambda row: -row["auroc"]["mean"])


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ablation_markdown(ablation: dict, plot_name: str) -> str:
    lines = [
        "# Ablations and baselines on the same cached features",
        "",
        f"Held-out image AUROC % on {ablation['heldout_images']} images (hash `{ablation['heldout_hash'][:12]}`), "
        f"backbone {ablation['backbone']} ({ablation['weights']}); seeds {ablation['seeds']}. AUROC: mean ± "
        "sample std over seeds (n); CI: bootstrap 95 % of the category-mean AUROC; Δ: this row minus "
        f"`{ablation['reference']}`, with a paired bootstrap 95 % CI (the same resampled images for both rows). "
        "Rows sorted by AUROC.",
        "",
    ]
    if ablation["random_weights"]:
        lines += [f"> **{NOT_MEANINGFUL}.**", ""]
    lines += [
        "| configuration | method | AUROC % | 95 % CI | AP % | F1-max % | Δ vs full [95 % CI] | AUPRO % | "
        "inside margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ablation["rows"]:
        auroc = row["auroc"]
        std = f" ± {auroc['std']:.2f}" if auroc["std"] is not None else ""
        low, high = row["auroc_ci95"]
        diff = row["difference"]
        delta = (
            "—"
            if row["configuration"] == ablation["reference"]
            else f"{diff['value']:+.2f} [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}]"
        )
        lines.append(
            f"| {row['configuration']} | {row['method']} | {auroc['mean']:.2f}{std} (n={auroc['n']}) | "
            f"[{low:.1f}, {high:.1f}] | {_fmt(row['average_precision'])} | {_fmt(row['f1_max'])} | {delta} | "
            f"{_fmt(row.get('aupro'))} | {_fmt(row['anomalous_inside_margin'])} |"
        )
    diverged = ablation.get("diverged") or {}
    if diverged:
        lines += [
            "",
            "Diverged runs (loss or gradient not finite; no checkpoint, left out of their row; a row "
            "whose every run diverged is missing): "
            + "; ".join(f"{name}: {diverged_cell(records)}" for name, records in diverged.items()),
        ]
    lines += [
        "",
        f"![differences from {ablation['reference']}]({plot_name})",
        "",
        "Per-category tables and plots: `raml report OUT/runs/results OUT/rescored OUT/baselines --out REPORT`.",
        "",
    ]
    return "\n".join(lines)
