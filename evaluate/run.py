"""``evaluate``: score trained checkpoints on a feature cache under a protocol and write results.

Several checkpoints may be given (run directories, checkpoint files, or a sweep directory holding
runs). A configuration is a set of runs with one name — the run directory's name without its
``-seed<k>`` suffix, or ``--name`` — whose recorded training configs (in the checkpoints) are
equal once the seed is taken out; runs of one name whose configs differ are refused, naming the
fields. The seeds of a configuration must share the held-out images; their metrics become mean ±
sample std (``evaluate.results.mean_std``).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cache import UserError, read_cache
from evaluate.localisation import coarse_pixel_auroc, maps_from_crop_scores, tile_text_scores
from evaluate.metrics import DEFAULT_BOOTSTRAP
from evaluate.protocols import select_images
from evaluate.results import ScoredRun, config_entry, in_percent, mean_std, pixel_summary, write_results
from train.checkpoint import CHECKPOINT_FILE, Checkpoint, check_cache, load_checkpoint
from train.config import TrainConfig
from train.infer import score_table, score_weights
from train.thresholds import operating_point

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


def group_configurations(paths, name: str | None = None) -> dict[str, list[Checkpoint]]:
    """Load the checkpoints and group them into configurations (see the module docstring).

    Raises ``UserError`` when runs of one name were trained with different settings (the message
    names the differing fields and both values) or when two of them have the same seed.
    """
    groups = defaultdict(list)
    for path in paths:
        groups[name or config_name(path)].append(load_checkpoint(path))
    for config, checkpoints in groups.items():
        reference = TrainConfig.from_dict(checkpoints[0].config).without_seed()
        for checkpoint in checkpoints[1:]:
            settings = TrainConfig.from_dict(checkpoint.config).without_seed()
            differ = sorted(key for key in reference if settings.get(key) != reference[key])
            if differ:
                details = "; ".join(f"{key}: {reference[key]!r} vs {settings.get(key)!r}" for key in differ)
                raise UserError(f"{checkpoints[0].path} and {checkpoint.path} both name configuration {config!r} but "
                                f"were trained with different settings ({details}): they are not seeds of one "
                                "configuration. Evaluate them separately, or give their run directories other names.")
        seeds = [checkpoint.config["seed"] for checkpoint in checkpoints]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            same = [str(c.path) for c in checkpoints if c.config["seed"] == repeated[0]]
            raise UserError(f"configuration {config!r} has two runs with seed {repeated[0]} ({', '.join(same)}): "
                            "the same run twice would count as two seeds. Evaluate one of them.")
    return dict(groups)


def last_epoch_inside_margin(checkpoints: list[Checkpoint]) -> dict | None:
    """The results fields ``anomalous_inside_margin`` (mean over seeds of each run's last-epoch
    value, from the ``history.json`` beside its checkpoint) and ``anomalous_inside_margin_over_seeds``
    (``mean_std``); None when no run recorded it (runs trained before it existed)."""
    values = []
    for checkpoint in checkpoints:
        history_path = checkpoint.path.parent / "history.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        values.append(history[-1].get("anomalous_inside_margin") if history else None)
    stats = mean_std(values)
    if not stats["n"]:
        return None
    return {"anomalous_inside_margin": stats["mean"], "anomalous_inside_margin_over_seeds": stats}


def thresholds_on_scored_images(runs: list[ScoredRun], checkpoints: list[Checkpoint]) -> dict:
    """Per category, precision and recall (in %) of each checkpoint's decision threshold
    (``evaluate.deploy.predict.threshold_for``) on the images it was scored on, mean ± std over seeds:
    how the thresholds calibrated on training images hold up on held-out ones."""
    from evaluate.deploy.predict import threshold_for
    summary = {}
    for category in sorted(set(runs[0].category.tolist())):
        here = runs[0].category == category
        points = [operating_point(run.label[here], run.scores["final"][here], threshold_for(checkpoint, category))
                  for run, checkpoint in zip(runs, checkpoints)]
        summary[category] = {key: in_percent(mean_std([point[key] for point in points])) for key in ("precision", "recall")}
    return summary


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
    table = read_cache(cache_dir) if table is None else table
    groups = group_configurations(find_checkpoints(checkpoints), name)
    runs, image_lists, settings, scored_rows = defaultdict(list), {}, {}, set()
    for config, group in groups.items():
        for checkpoint in group:
            path = checkpoint.path
            check_cache(checkpoint, table)
            rows, image_list = select_images(protocol, checkpoint.manifest, str(path), table,
                                             training_dataset=checkpoint.fingerprint.get("dataset"))
            log(f"evaluate {config} ({path}): {image_list.protocol} protocol, {len(rows)} images")
            subset = table.select(rows)
            weights = score_weights(checkpoint, visual_weight, text_weight)
            scores = score_table(checkpoint, subset, **weights, device=device)
            runs[config].append(ScoredRun(config, checkpoint.config.get("seed"), str(path), subset.category,
                                          subset.relpath, subset.defect_type, subset.label,
                                          {k: np.asarray(v, float) for k, v in scores.items()}))
            image_lists[config] = image_list.describe()
            scored_rows.update(rows.tolist())
        training = TrainConfig.from_dict(group[0].config).without_seed()
        settings[config] = {"margin": training["margin"], "score_weights": weights, "config": training,
                            "checkpoint_thresholds": thresholds_on_scored_images(runs[config], group)}
        inside = last_epoch_inside_margin(group)
        if inside is not None:
            settings[config].update(inside)

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
