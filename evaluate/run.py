"""``evaluate``: score trained checkpoints on a feature cache under a protocol and write results.

Several checkpoints may be given (run directories, checkpoint files, or a sweep directory holding
runs). A configuration is a set of runs with one name — the run directory's name without its
``-seed<k>`` suffix, or ``--name`` — whose recorded training configs (in the checkpoints) are
equal once the seed is taken out; runs of one name whose configs differ are refused, naming the
fields. The seeds of a configuration must share the held-out images; their metrics become mean ±
sample std (``evaluate.results.mean_std``).

Runs with a pixel head (trained on a cache with patch tokens) are scored at the pixel level too,
on the same images: their maps (evaluate/localisation.py) give the entry's ``pixel`` block, and
``map_weight`` > 0 makes the image score use them (``train.infer.fused_score``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from raml.cache import read_cache
from raml.cache.reader import require_tokens
from raml.cache.tokens import TILES, add_tokens_command, token_grid
from raml.errors import CacheError, UserError
from raml.evaluate.bootstrap_settings import DEFAULT_BOOTSTRAP
from raml.evaluate.localisation import PIXEL_HEAD_MAP, map_images, not_scored_block, pixel_block, score_tokens
from raml.evaluate.protocols import select_images
from raml.evaluate.results import MapSet, ScoredRun, config_entry, in_percent, mean_std, write_results
from raml.train.checkpoint import CHECKPOINT_FILE, Checkpoint, check_cache, check_tokens, load_checkpoint
from raml.train.config import TrainConfig
from raml.train.infer import fused_score, pixel_scores, score_table, score_weights
from raml.train.sweep import METRICS_FILE
from raml.train.thresholds import operating_point

_SEED_SUFFIX = re.compile(r"[-_]seed\d+$")


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
            raise FileNotFoundError(
                f"{path}: no {CHECKPOINT_FILE} here nor in its sub-directories; train one with "
                "raml train --cache-dir ... --out RUN_DIR"
            )
    return found


def diverged_runs(paths) -> dict[str, list]:
    """The runs of the sweep directories among ``paths`` that diverged (``metrics.json`` with a
    ``diverged`` record and no checkpoint), by configuration, as a sweep records them."""
    found = defaultdict(list)
    for path in map(Path, paths):
        for metrics_path in sorted(path.glob(f"*/{METRICS_FILE}")) if path.is_dir() else ():
            if (metrics_path.parent / CHECKPOINT_FILE).exists():
                continue
            try:
                record = json.loads(metrics_path.read_text()).get("diverged")
            except (OSError, ValueError, AttributeError):
                continue  # not a sweep's run file: nothing to report here
            if isinstance(record, dict):
                found[config_name(metrics_path.parent / CHECKPOINT_FILE)].append(
                    {"run": metrics_path.parent.name, **record}
                )
    return dict(found)


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
                raise UserError(
                    f"{checkpoints[0].path} and {checkpoint.path} both name configuration {config!r} but "
                    f"were trained with different settings ({details}): they are not seeds of one "
                    "configuration. Evaluate them separately, or give their run directories other names."
                )
        seeds = [checkpoint.config["seed"] for checkpoint in checkpoints]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            same = [str(c.path) for c in checkpoints if c.config["seed"] == repeated[0]]
            raise UserError(
                f"configuration {config!r} has two runs with seed {repeated[0]} ({', '.join(same)}): "
                "the same run twice would count as two seeds. Evaluate one of them."
            )
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
    (``train.thresholds.threshold_for``) on the images it was scored on, mean ± std over seeds:
    how the thresholds calibrated on training images hold up on held-out ones."""
    from raml.train.thresholds import threshold_for

    summary = {}
    for category in sorted(set(runs[0].category.tolist())):
        here = runs[0].category == category
        points = [
            operating_point(run.label[here], run.scores["final"][here], threshold_for(checkpoint, category))
            for run, checkpoint in zip(runs, checkpoints)
        ]
        summary[category] = {
            key: in_percent(mean_std([point[key] for point in points])) for key in ("precision", "recall")
        }
    return summary


def backbone_fields(meta: dict) -> dict:
    """What a results entry records about the features it was computed from."""
    return {
        "backbone": meta.get("backbone"),
        "weights": meta.get("weights"),
        "random_weights": bool(meta.get("random_weights")),
        "input_size": meta.get("input_size"),
    }


def evaluate_checkpoints(
    checkpoints,
    cache_dir,
    out_dir,
    *,
    protocol: str | None = None,
    visual_weight: float | None = None,
    text_weight: float | None = None,
    map_weight: float = 0.0,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    name: str | None = None,
    log=print,
    table=None,
    device: str = "cpu",
    diverged: dict | None = None,
    steps=None,
) -> tuple[Path, dict]:
    """Score every checkpoint on ``cache_dir`` and write ``out_dir``/{results.json, scores.csv,
    anomaly_maps.npz}. Returns the results path and the entries. ``table``: the cache already read
    (a sweep passes its own), else it is read from ``cache_dir``. ``map_weight``: the image score is
    ``fused_score`` of s_final and the pixel head's map (0: s_final). ``diverged``: configuration →
    its runs that diverged (they have no checkpoint), recorded in its entry; default: those of the
    sweep directories among ``checkpoints`` (``diverged_runs``). ``steps`` (``cli.progress.Progress``
    or None) counts the runs scored."""
    table = read_cache(cache_dir) if table is None else table
    groups = group_configurations(find_checkpoints(checkpoints), name)
    diverged = diverged_runs(checkpoints) if diverged is None else diverged
    for record in (record for records in diverged.values() for record in records):
        log(
            f"evaluate: {record['run']} diverged (epoch {record['epoch']}, step {record['step']}: {record['term']}): "
            "no checkpoint, not scored"
        )
    runs, image_lists, settings, config_rows = defaultdict(list), {}, {}, {}
    if steps:
        steps.begin("evaluate", sum(len(group) for group in groups.values()), "runs")
    for config, group in groups.items():
        for checkpoint in group:
            path = checkpoint.path
            check_cache(checkpoint, table)
            rows, image_list = select_images(
                protocol, checkpoint.manifest, str(path), table, training_dataset=checkpoint.fingerprint.get("dataset")
            )
            log(f"evaluate {config} ({path}): {image_list.protocol} protocol, {len(rows)} images")
            subset = table.select(rows)
            weights = score_weights(checkpoint, visual_weight, text_weight)
            scores = score_table(checkpoint, subset, **weights, device=device)
            runs[config].append(
                ScoredRun(
                    config,
                    checkpoint.config.get("seed"),
                    str(path),
                    subset.category,
                    subset.relpath,
                    subset.defect_type,
                    subset.label,
                    {k: np.asarray(v, float) for k, v in scores.items()},
                )
            )
            image_lists[config] = image_list.describe()
            config_rows[config] = rows
            if steps:
                steps.advance()
        training = TrainConfig.from_dict(group[0].config).without_seed()
        settings[config] = {
            "margin": training["margin"],
            "score_weights": {**weights, "map_weight": map_weight},
            "config": training,
            "checkpoint_thresholds": thresholds_on_scored_images(runs[config], group),
        }
        inside = last_epoch_inside_margin(group)
        if inside is not None:
            settings[config].update(inside)
    if steps:
        steps.end()

    pixel, maps = _pixel_head_maps(table, groups, runs, config_rows, map_weight, n_resamples, bootstrap_seed, log)
    entries = {}
    for config, config_runs in runs.items():
        entries[config] = config_entry(
            config_runs,
            image_lists[config],
            backbone_fields(table.meta),
            n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed,
            pixel=pixel.get(config),
            extra={
                "method": "RAML",
                **settings[config],
                "cache_dir": str(table.cache_dir),
                **({"diverged": diverged[config]} if (diverged or {}).get(config) else {}),
            },
        )
    path = write_results(out_dir, entries, [run for config_runs in runs.values() for run in config_runs], maps=maps)
    return path, entries


def _pixel_head_maps(
    table, groups: dict, runs: dict, config_rows: dict, map_weight: float, n_resamples: int, bootstrap_seed: int, log
) -> tuple[dict, dict]:
    """The maps of the configurations whose runs have a pixel head: their ``pixel`` blocks and ``MapSet``s
    (by configuration). With ``map_weight`` > 0, each run's image score becomes ``fused_score`` of its
    s_final and its map's maximum (the largest token score), kept as ``map_max`` in scores.csv."""
    mapped = [config for config, group in groups.items() if all(c.model.pixel is not None for c in group)]
    if map_weight and set(mapped) != set(groups):
        unmapped = sorted(set(groups) - set(mapped))
        raise CacheError(
            f"--map-weight {map_weight:g} scores images with their anomaly map, but the runs of "
            f"{', '.join(unmapped)} have no pixel head (train them on a cache with patch tokens and masks)"
        )
    if not mapped:
        return {}, {}
    rows = np.unique(np.concatenate([config_rows[config] for config in mapped]))
    if not table.has_tokens[rows].all():
        if map_weight:
            require_tokens(table, rows)  # says how to add them
        reason = f"the cache has no patch tokens for these images (add them: {add_tokens_command(table.meta, table.cache_dir)})"
        return {
            config: not_scored_block(PIXEL_HEAD_MAP, reason, table.category[config_rows[config]]) for config in mapped
        }, {}
    for config in mapped:
        for checkpoint in groups[config]:
            check_tokens(checkpoint, table.token_setting, table.cache_dir)
    log(f"evaluate: anomaly maps of {', '.join(mapped)} ({len(rows)} images' patch tokens)")
    scorers = [
        lambda tokens, _, model=checkpoint.model: pixel_scores(model, tokens)
        for config in mapped
        for checkpoint in groups[config]
    ]
    scores, masks = score_tokens(table, rows, scorers)
    per_run = iter(scores)
    per_tile, pixel, maps = table.token_setting["per_tile"], {}, {}
    for config in mapped:
        position = np.searchsorted(rows, config_rows[config])
        config_scores = [next(per_run)[position] for _ in groups[config]]
        grids = [token_grid(run_scores, per_tile) for run_scores in config_scores]
        subset = table.select(config_rows[config])
        pixel[config] = pixel_block(
            grids,
            map_images(subset, masks[position]),
            PIXEL_HEAD_MAP,
            n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed,
        )
        maps[config] = MapSet(subset.relpath, subset.mask_relpath, grids[0], TILES, PIXEL_HEAD_MAP)
        if map_weight:
            for run, run_scores in zip(runs[config], config_scores):
                run.scores["map_max"] = run_scores.max(axis=1).astype(float)
                run.scores["final"] = fused_score(run.scores["final"], run.scores["map_max"], map_weight)
    return pixel, maps
