"""``evaluate``: score trained checkpoints on a feature cache under a protocol and write results.

Several checkpoints may be given (run directories, checkpoint files, or a sweep directory holding
runs). Runs whose directory names differ only by a ``-seed<k>`` suffix are seeds of one
configuration: their metrics become mean ± std, and they must share the same held-out images.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cache import UserError, read_cache
from evaluate.localisation import coarse_pixel_auroc, maps_from_crop_scores, tile_text_scores
from evaluate.metrics import DEFAULT_BOOTSTRAP
from evaluate.protocols import select_images
from evaluate.results import ScoredRun, config_entry, pixel_summary, write_results
from train.checkpoint import CHECKPOINT_FILE, check_cache, load_checkpoint
from train.infer import score_table, score_weights

_SEED_SUFFIX = re.compile(r"[-_]seed\d+$")
MAP_SOURCE = ("zero-shot text score of the cached 2x2 and 4x4 tiles (the same map for every configuration "
              "scored on this cache: the head scores whole images)")


def find_checkpoints(paths) -> list[Path]:
    """Checkpoint files named directly, in run directories, or in the run directories of a sweep."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / CHECKPOINT_FILE).is_file():
            found.append(path / CHECKPOINT_FILE)
        elif path.is_dir() and sorted(path.glob(f"*/{CHECKPOINT_FILE}")):
            found += sorted(path.glob(f"*/{CHECKPOINT_FILE}"))
        else:
            raise FileNotFoundError(f"{path}: no {CHECKPOINT_FILE} here nor in its sub-directories; train one with "
                                    "python pipeline.py train --cache-dir ... --out RUN_DIR")
    return found


def config_name(checkpoint_path: Path) -> str:
    """``runs/ablation/adaptive-seed3/checkpoint.pt`` → ``adaptive``; ``runs/raml`` → ``raml``."""
    run_dir = checkpoint_path.parent if checkpoint_path.name == CHECKPOINT_FILE else checkpoint_path.with_suffix("")
    return _SEED_SUFFIX.sub("", run_dir.name)


def backbone_fields(meta: dict) -> dict:
    """What a results entry records about the features it was computed from."""
    return {"backbone": meta.get("backbone"), "weights": meta.get("weights"),
            "random_weights": bool(meta.get("random_weights")), "input_size": meta.get("input_size")}


def evaluate_checkpoints(checkpoints, cache_dir, out_dir, *, protocol: str | None = None,
                         visual_weight: float | None = None, text_weight: float | None = None, n_resamples: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = 0,
                         name: str | None = None, log=print, table=None, device: str = "cpu") -> tuple[Path, dict]:
    """Score every checkpoint on ``cache_dir`` and write ``out_dir``/{results.json, scores.csv,
    anomaly_maps.npz}. Returns the results path and the entries. ``table``: the cache already read
    (a sweep passes its own), else it is read from ``cache_dir``."""
    paths = find_checkpoints(checkpoints)
    table = read_cache(cache_dir) if table is None else table
    groups = defaultdict(list)
    for path in paths:
        groups[config_name(path)].append(path)
    if name is not None:
        if len(groups) > 1:
            raise UserError(f"--name applies to one configuration, but these checkpoints form {len(groups)}: "
                             f"{', '.join(groups)}")
        groups = {name: paths}

    runs, image_lists, settings, scored_rows = defaultdict(list), {}, {}, set()
    for config, config_paths in groups.items():
        for path in config_paths:
            checkpoint = load_checkpoint(path)
            check_cache(checkpoint, table)
            rows, image_list = select_images(protocol, checkpoint.manifest, str(path), table)
            log(f"evaluate {config} ({path}): {image_list.protocol} protocol, {len(rows)} images")
            subset = table.select(rows)
            weights = score_weights(checkpoint, visual_weight, text_weight)
            scores = score_table(checkpoint, subset, **weights, device=device)
            runs[config].append(ScoredRun(config, checkpoint.config.get("seed"), str(path), subset.category,
                                          subset.relpath, subset.defect_type, subset.label,
                                          {k: np.asarray(v, float) for k, v in scores.items()}))
            image_lists[config] = image_list.describe()
            settings[config] = {"margin": checkpoint.config.get("margin"), "score_weights": weights,
                                "config": checkpoint.config}
            scored_rows.update(rows.tolist())

    rows = np.array(sorted(scored_rows))
    subset = table.select(rows)
    maps = maps_from_crop_scores(tile_text_scores(subset))
    dataset_root = table.meta.get("dataset", {}).get("root")
    pixel = pixel_summary(*coarse_pixel_auroc(maps, subset.category, subset.label, subset.mask_relpath,
                                              subset.height, subset.width, dataset_root), MAP_SOURCE)
    entries = {}
    for config, config_runs in runs.items():
        entries[config] = config_entry(
            config_runs, image_lists[config], backbone_fields(table.meta), n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed, pixel=pixel,
            extra={"method": "RAML", **settings[config], "cache_dir": str(table.cache_dir)})
    path = write_results(out_dir, entries, [run for config_runs in runs.values() for run in config_runs],
                         maps={"relpath": subset.relpath, "mask_relpath": subset.mask_relpath, "maps": maps,
                               "description": "tile text score, 4x4"})
    return path, entries
