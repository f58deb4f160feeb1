"""Where the defect is: anomaly maps from the cached patch tokens, and their pixel metrics.

Every map kind gives one score per patch token (``cache.tokens``: the 4x4 tiles' pooled tokens of
an image), each a row of the same table:

- the trained **pixel head** (train/model.py ``PixelHead``), learned with the image head on the
  training images' per-token defect fractions (``evaluate``, for runs that have one);
- **kNN** over the training normals' tokens, a PatchCore-style memory bank (baseline
  ``knn-patches``, evaluate/baselines/features.py), no training;
- **zero-shot text** (``zero_shot_token_scores``): each token's softmax probability of the
  category's anomalous prompts against its normal ones, at WinCLIP's temperature 0.07 (baseline
  ``zero-shot-text``), no training.

A map over the image is the token grid interpolated where each token lies (``cache.tokens.map_at``);
there is one scale of tiles, so no two scales overlap. Pixel metrics (``pixel_block``) are computed
at ``EVAL_MASK_SIDE`` x ``EVAL_MASK_SIDE`` points per image: the map and the defect mask sampled at
the same points (stage one stored the mask there; anomalib-style tools likewise resize to 256 x 256).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raml.cache.reader import token_chunks
from raml.cache.tokens import EVAL_MASK_BYTES, EVAL_MASK_SIDE, TILES, eval_maps, unpack_eval_masks
from raml.evaluate.baselines.winclip import TEMPERATURE as ZERO_SHOT_TEMPERATURE
from raml.evaluate.bootstrap_settings import DEFAULT_BOOTSTRAP
from raml.evaluate.metrics import AUPRO_FPR_LIMIT, bootstrap_pixel_ci, pixel_counts, pixel_metrics
from raml.evaluate.results import PIXEL_METRICS, in_percent, mean_std

RESOLUTION_NOTE = (
    f"computed at {EVAL_MASK_SIDE} x {EVAL_MASK_SIDE} points per image (the map and the defect "
    f"mask sampled at the same points); AUPRO up to FPR {AUPRO_FPR_LIMIT}, 8-connected defect regions"
)
PIXEL_HEAD_MAP = "RAML's trained pixel head: sigmoid of each patch token's logit"
ZERO_SHOT_MAP = (
    f"zero-shot text over RAML's patch tokens: each token's softmax probability of the anomalous "
    f"prompts (temperature {ZERO_SHOT_TEMPERATURE})"
)


def zero_shot_token_scores(tokens: np.ndarray, text_bank: np.ndarray, category_index) -> np.ndarray:
    """[n, T] zero-shot score of each token ([n, T, D]): sigmoid((cos(t, anomalous) − cos(t, normal)) / τ),
    the two-prompt softmax of WinCLIP's Eq. 1; ``text_bank`` [C, 2, D] (``train.infer.text_tokens``),
    ``category_index`` [n] into it."""
    tokens = np.asarray(tokens, np.float32)
    tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    cosines = np.einsum("ntd,nkd->ntk", tokens, np.asarray(text_bank, np.float32)[np.asarray(category_index)])
    return 0.5 * (1.0 + np.tanh(0.5 * (cosines[..., 1] - cosines[..., 0]) / ZERO_SHOT_TEMPERATURE))  # sigmoid


def score_tokens(table, rows, scorers: list) -> tuple[list[np.ndarray], np.ndarray]:
    """Read the patch tokens of ``table``'s ``rows`` a chunk at a time and score them with each of
    ``scorers`` (``scorer(tokens [c, T, D] float16, rows [c]) → [c, T]``); returns each scorer's
    scores [n, T] and the rows' packed scoring masks [n, EVAL_MASK_BYTES]."""
    rows = np.asarray(rows)
    scores = [np.empty((len(rows), table.token_defect.shape[1]), np.float32) for _ in scorers]
    masks = np.empty((len(rows), EVAL_MASK_BYTES), np.uint8)
    for positions, tokens, chunk_masks in token_chunks(table, rows):
        masks[positions] = chunk_masks
        for out, scorer in zip(scores, scorers):
            out[positions] = scorer(tokens, rows[positions])
    return scores, masks


@dataclass
class MapImages:
    """The scored images, with what their pixel metrics need."""

    category: np.ndarray
    label: np.ndarray
    mask_known: np.ndarray  # bool: normal, or anomalous with a defect mask
    height: np.ndarray
    width: np.ndarray
    masks: np.ndarray  # [n, EVAL_MASK_BYTES] packed scoring masks (``cache.tokens.eval_mask``)


def map_images(subset, masks: np.ndarray) -> MapImages:
    """``MapImages`` of a ``FeatureTable`` (the scored rows, with patch tokens) and their packed masks from
    ``score_tokens``; an image's mask is known where stage one stored its defect fractions (not NaN)."""
    known = ~np.isnan(subset.token_defect).any(axis=1)
    return MapImages(subset.category, subset.label, known, subset.height, subset.width, masks)


def pixel_block(
    grids_by_run: list[np.ndarray],
    images: MapImages,
    description: str,
    *,
    tiles: int = TILES,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
) -> dict:
    """The ``pixel`` block of a results entry: per category, pixel AUROC, AUPRO and pixel F1-max (%) of
    the maps of each run (``grids_by_run``: [n, G, G] token grids of the images, one per seed; ``tiles``
    tiles a side, 1 for a grid over the whole image), mean ± sample std over seeds with n and a bootstrap
    CI of the seed mean; the mean over categories; and n/a with the reason for categories without masks.
    Anomalous images without a mask are left out."""
    per_category, missing, means = {}, {}, {name: [] for name in PIXEL_METRICS}
    for category in sorted(set(images.category.tolist())):
        rows = np.flatnonzero((images.category == category) & images.mask_known)
        if not (images.label[rows] == 1).any():
            missing[category] = "no defect masks"
            continue
        masks = unpack_eval_masks(images.masks[rows])
        try:
            counts = [
                pixel_counts(eval_maps(grids[rows], images.height[rows], images.width[rows], tiles), masks)
                for grids in grids_by_run
            ]
        except ValueError as err:
            missing[category] = str(err)
            continue
        values = [pixel_metrics(run) for run in counts]
        intervals = bootstrap_pixel_ci(counts, n_resamples, bootstrap_seed)
        per_category[category] = {
            "images": int(len(rows)),
            "anomalous": int((images.label[rows] == 1).sum()),
            **{
                name: {
                    **in_percent(mean_std([v[name] for v in values])),
                    "per_seed": [round(100 * float(v[name]), 2) for v in values],
                    "ci95": [round(100 * bound, 2) for bound in intervals[name]],
                }
                for name in PIXEL_METRICS
            },
        }
        for name in PIXEL_METRICS:
            means[name].append([float(v[name]) for v in values])
    mean = {
        name: {
            **in_percent(mean_std(np.mean(runs, axis=0))),
            "per_seed": [round(100 * float(v), 2) for v in np.mean(runs, axis=0)],  # each seed's category mean
        }
        if runs
        else in_percent(mean_std([]))
        for name, runs in means.items()
    }
    return {
        "map": description,
        "resolution": RESOLUTION_NOTE,
        "mean": mean,
        "categories": per_category,
        "not_available": missing,
        "units": "%; mean ± sample std (ddof = 1) over seeds; ci95: bootstrap over images of the seed mean",
    }


def not_scored_block(description: str, reason: str, categories) -> dict:
    """The ``pixel`` block of an entry whose maps were not drawn: every category n/a with ``reason``."""
    return {
        "map": description,
        "resolution": RESOLUTION_NOTE,
        "mean": {name: in_percent(mean_std([])) for name in PIXEL_METRICS},
        "categories": {},
        "not_available": {category: reason for category in sorted(set(categories))},
    }
