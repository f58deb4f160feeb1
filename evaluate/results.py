"""Results files: per-image scores (CSV) and per-configuration metrics (JSON).

The JSON keeps the original RAML release's schema readable —
``{"<config>": {"mean_auroc": 94.09, "details": {"bottle": 100.0, ...}}}`` with AUROC in % — and
puts everything else beside it: the sample standard deviation over seeds and their number n
(``mean_std``, the project's one aggregation over seeds), AP, F1-max and its threshold, the
bootstrap 95 % CI (per category, and of the category mean: ``mean_auroc_ci95``), each seed's own
AUROC, AP and F1-max (``per_seed``), the pixel metrics of the configuration's anomaly maps (``pixel``:
evaluate/localisation.py), the seeds, the protocol and the hash of the exact image list, and the
backbone (with ``random_weights``: such results are marked not meaningful).

``anomaly_maps.npz`` keeps, per configuration with maps, its first seed's map of each scored image
as the grid it is drawn from (``<config>:grid`` [n, G, G] float16, ``<config>:relpath``,
``<config>:mask_relpath``); the entry's ``anomaly_maps`` says where the grid's cells lie (``tiles``
a side: 4 for the cached patch tokens, 1 for a grid over the whole image) and what the map is.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raml.cache.files import atomic_write, atomic_write_text, make_dirs
from raml.errors import UserError
from raml.evaluate.bootstrap_settings import CI_LEVEL, DEFAULT_BOOTSTRAP
from raml.evaluate.file_names import MAPS_NPZ, RESULTS_JSON, SCORES_CSV
from raml.evaluate.metrics import average_precision, bootstrap_auroc_ci, bootstrap_mean_auroc_ci, image_auroc
from raml.train.thresholds import f1_max

MAP_EXAMPLES = 4  # test images a report shows with their anomaly maps, per table (``pick_examples``)
SCORE_COLUMNS = ("config", "seed", "category", "relpath", "defect_type", "label")
NOT_MEANINGFUL = (
    "NOT MEANINGFUL: computed with randomly initialised CLIP weights (--random-weights); "
    "these numbers only show that the pipeline runs"
)


@dataclass
class ScoredRun:
    """One model (one seed of one configuration) scored on one image list."""

    config: str
    seed: int | None
    source: str  # checkpoint path, or the method's name for zero-shot baselines
    category: np.ndarray
    relpath: np.ndarray
    defect_type: np.ndarray
    label: np.ndarray
    scores: dict  # name -> [N] array; "final" is the one the metrics use
    extra: dict = field(default_factory=dict)


def _percent(value: float) -> float:
    return round(100.0 * value, 2)


def mean_std(values) -> dict:
    """Mean ± sample standard deviation (ddof = 1) over seeds: the one aggregation of the project.

    ``values`` holds one number per seed; ``None`` (a seed without that number, e.g. a category
    that run could not score) is left out and not counted. Returns ``{"mean", "std", "n"}``;
    ``std`` is None for n = 1 (one seed says nothing about the spread), ``mean`` too for n = 0.
    Two seeds at 50.0 and 72.22 give 61.11 ± 15.71 (n = 2).
    """
    kept = [float(value) for value in values if value is not None]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None, "n": len(kept)}


def _percent_std(stats: dict) -> float | None:
    return None if stats["std"] is None else _percent(stats["std"])


def in_percent(stats: dict) -> dict:
    """``mean_std`` output of fractions, in % (rounded to 0.01)."""
    return {
        "mean": None if stats["mean"] is None else _percent(stats["mean"]),
        "std": _percent_std(stats),
        "n": stats["n"],
    }


def category_summary(labels: np.ndarray, final_by_run: np.ndarray, n_resamples: int, seed: int) -> tuple[dict, dict]:
    """Metrics of one category for one configuration, and each run's AUROC, AP and F1-max (fractions:
    ``{"auroc": [...], "average_precision": [...], "f1_max": [...]}``); ``final_by_run`` is [runs, n].

    Means and standard deviations are over runs (seeds), through ``mean_std``. Raises
    ``ValueError`` (from the metric functions) when the category has one class only.
    """
    aurocs = [image_auroc(labels, run) for run in final_by_run]
    ap_per_run = [average_precision(labels, run) for run in final_by_run]
    aps = mean_std(ap_per_run)
    f1s = [f1_max(labels, run) for run in final_by_run]
    f1 = mean_std([f for f, _ in f1s])
    auroc = mean_std(aurocs)
    low, high = bootstrap_auroc_ci(labels, final_by_run, n_resamples=n_resamples, seed=seed)
    return {
        "auroc": _percent(auroc["mean"]),
        "auroc_std": _percent_std(auroc),
        "auroc_over_seeds": in_percent(auroc),
        "auroc_per_seed": [_percent(a) for a in aurocs],
        "auroc_ci95": [_percent(low), _percent(high)],
        "average_precision": _percent(aps["mean"]),
        "average_precision_std": _percent_std(aps),
        "f1_max": _percent(f1["mean"]),
        "f1_max_std": _percent_std(f1),
        "f1_max_threshold": [round(t, 6) for _, t in f1s],
        "normal": int((labels == 0).sum()),
        "anomalous": int((labels == 1).sum()),
    }, {"auroc": aurocs, "average_precision": ap_per_run, "f1_max": [f for f, _ in f1s]}


def config_entry(
    runs: list[ScoredRun],
    image_list: dict,
    backbone: dict,
    *,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    pixel: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The results entry of one configuration scored (once per seed) on one image list."""
    _check_same_images(runs)
    first = runs[0]
    final = np.stack([run.scores["final"] for run in runs])
    per_category, not_available, per_run = {}, {}, {"auroc": [], "average_precision": [], "f1_max": []}
    for category in sorted(set(first.category.tolist())):
        rows = first.category == category
        try:
            per_category[category], category_per_run = category_summary(
                first.label[rows], final[:, rows], n_resamples, bootstrap_seed
            )
        except ValueError as err:
            not_available[category] = str(err)
            continue
        for name, values in category_per_run.items():
            per_run[name].append(values)
    if not per_category:
        raise UserError(
            f"{first.config}: no category has both normal and anomalous images "
            f"({'; '.join(f'{c}: {r}' for c, r in not_available.items())})"
        )
    # the original release's number: per run, the mean AUROC over categories; then over runs
    over_seeds = mean_std(np.mean(per_run["auroc"], axis=0))
    scored = np.isin(first.category, list(per_category))
    _, low, high = bootstrap_mean_auroc_ci(
        first.label[scored], final[:, scored], first.category[scored], n_resamples, bootstrap_seed
    )
    entry = {
        "mean_auroc": _percent(over_seeds["mean"]),
        "details": {category: s["auroc"] for category, s in per_category.items()},
        "std_auroc": _percent_std(over_seeds),
        "auroc_over_seeds": in_percent(over_seeds),
        "mean_auroc_ci95": [_percent(low), _percent(high)],
        # each seed's own numbers: the mean over categories of that run's AUROC, AP and F1-max
        "per_seed": {
            "seed": [run.seed for run in runs],
            **{name: [_percent(v) for v in np.mean(values, axis=0)] for name, values in per_run.items()},
        },
        "mean_average_precision": round(float(np.mean([s["average_precision"] for s in per_category.values()])), 2),
        "mean_f1_max": round(float(np.mean([s["f1_max"] for s in per_category.values()])), 2),
        "categories": per_category,
        "not_available": not_available,
        "seeds": [run.seed for run in runs],
        "sources": [run.source for run in runs],
        "protocol": image_list,
        "bootstrap": {"resamples": n_resamples, "seed": bootstrap_seed, "stratified": True, "level": CI_LEVEL},
        **backbone,
        "meaningful": not backbone.get("random_weights", False),
        "units": "AUROC, AP and F1 in %; mean ± sample std (ddof = 1) over seeds; auroc_over_seeds gives n",
    }
    if backbone.get("random_weights"):
        entry["warning"] = NOT_MEANINGFUL
    if pixel is not None:
        entry["pixel"] = pixel
    entry.update(extra or {})
    return entry


@dataclass
class MapSet:
    """One configuration's maps, for ``anomaly_maps.npz``: its first seed's grid of each image."""

    relpath: np.ndarray
    mask_relpath: np.ndarray
    grids: np.ndarray  # [n, G, G]
    tiles: int  # tiles a side the grid's cells lie in (``cache.tokens.map_at``)
    description: str


def _check_same_images(runs: list[ScoredRun]) -> None:
    reference = runs[0].relpath.tolist()
    for run in runs[1:]:
        if run.relpath.tolist() != reference:
            raise UserError(
                f"{run.source} was scored on other images than {runs[0].source}; the seeds of one "
                "configuration must share the held-out split (train them with the same split seed)"
            )


def write_scores_csv(path: Path, runs: list[ScoredRun]) -> None:
    """One row per (run, image): the identifying columns and every score of the run (written
    atomically, like every results file)."""
    atomic_write(path, lambda tmp: _write_scores(tmp, runs))


def _write_scores(path: Path, runs: list[ScoredRun]) -> None:
    score_names = sorted({name for run in runs for name in run.scores}, key=lambda n: (n != "final", n))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*SCORE_COLUMNS, *score_names])
        for run in runs:
            for i in range(len(run.relpath)):
                writer.writerow(
                    [
                        run.config,
                        "" if run.seed is None else run.seed,
                        run.category[i],
                        run.relpath[i],
                        run.defect_type[i],
                        int(run.label[i]),
                        *(f"{run.scores[n][i]:.6f}" if n in run.scores else "" for n in score_names),
                    ]
                )


def read_scores_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_results(out_dir: Path, entries: dict, runs: list[ScoredRun], maps: dict | None = None) -> Path:
    """Write results.json, scores.csv and (with ``maps``: configuration → ``MapSet``) anomaly_maps.npz
    into ``out_dir``.

    Each file is replaced atomically (``cache.files.atomic_write``), results.json last: an
    interrupted write leaves the previous results, never a truncated file.
    """
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    write_scores_csv(out_dir / SCORES_CSV, runs)
    for entry in entries.values():
        entry["scores_csv"] = SCORES_CSV
    if maps:
        atomic_write(out_dir / MAPS_NPZ, lambda tmp: _write_maps(tmp, maps))
        for config, mapped in maps.items():
            entries[config]["anomaly_maps"] = {
                "file": MAPS_NPZ,
                "key": config,
                "tiles": mapped.tiles,
                "description": mapped.description,
            }
    path = out_dir / RESULTS_JSON
    atomic_write_text(path, json.dumps(entries, indent=2))
    return path


def _write_maps(path: Path, maps: dict) -> None:
    arrays = {}
    for config, mapped in maps.items():
        arrays.update(
            {
                f"{config}:relpath": np.asarray(mapped.relpath),
                f"{config}:mask_relpath": np.asarray(mapped.mask_relpath),
                f"{config}:grid": np.asarray(mapped.grids, np.float16),
            }
        )
    with open(path, "wb") as handle:  # a file object: savez would append ".npz" to a temporary name
        np.savez_compressed(handle, **arrays)


def read_maps(results_path: Path, entry: dict) -> dict | None:
    """An entry's maps from its ``anomaly_maps.npz``: {relpath: grid}, {relpath: mask_relpath}, tiles,
    description; None when it saved none (or saved them as RAML did before the
    patch-token maps)."""
    where = entry.get("anomaly_maps")
    path = Path(results_path).parent / where["file"] if isinstance(where, dict) else None
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as data:
            relpaths = data[f"{where['key']}:relpath"].tolist()
            grids = data[f"{where['key']}:grid"].astype(np.float32)
            masks = data[f"{where['key']}:mask_relpath"].tolist()
    except Exception as err:  # numpy and zipfile raise many types for a damaged file
        raise UserError(
            f"{path}: not the anomaly maps of {where['key']!r} that {results_path} names ({type(err).__name__}: {err})"
        ) from None
    if not (len(relpaths) == len(grids) == len(masks)) or grids.ndim != 3 or not np.isfinite(grids).all():
        raise UserError(f"{path}: the maps of {where['key']!r} are not one finite grid per image (edited by hand?)")
    return {
        "grids": dict(zip(relpaths, grids)),
        "masks": dict(zip(relpaths, masks)),
        "tiles": where["tiles"],
        "description": where["description"],
    }


def find_results(paths) -> list[Path]:
    """results.json files named directly or found (recursively) under the given directories."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob(RESULTS_JSON))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such results file or directory")
    if not found:
        raise FileNotFoundError(
            f"no {RESULTS_JSON} under {', '.join(map(str, paths))}; write one with raml evaluate ... --out DIR"
        )
    return found


PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max")  # an entry's pixel metrics (evaluate.localisation)


def pick_examples(records: list[dict], count: int) -> list[dict]:
    """The images a report shows with their maps: anomalous images of as many (category, defect
    type) pairs as possible, then one normal image. ``records`` hold category, relpath,
    defect_type and label (0/1, as numbers or strings); ``baseline winclip --maps examples`` makes
    maps for exactly these."""
    ordered = sorted(records, key=lambda r: (r["category"], r["relpath"]))
    anomalous, picked, seen = [r for r in ordered if str(r["label"]) == "1"], [], set()
    for record in anomalous:
        kind = (record["category"], record["defect_type"])
        if kind not in seen and len(picked) < count - 1:
            picked.append(record)
            seen.add(kind)
    picked += [r for r in anomalous if r not in picked][: count - 1 - len(picked)]
    picked += [r for r in ordered if str(r["label"]) == "0"][:1]
    return picked
