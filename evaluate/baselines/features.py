"""Baselines on the cached features: ``baseline linear``, ``baseline knn-tiles``, ``baseline zero-shot-text``.

Each reads only the feature cache (no CLIP forward), is scored on the held-out images of the
holdout protocol (those of a training run with ``--split-from RUN``, else the split a ``train``
with the same split seed makes), and writes results in the format of ``evaluate``, with the same
protocol and image-list hash, so that ``report`` puts it in RAML's table.

- ``linear``: logistic regression on the global crop's embedding, one model for all categories
  or one per category. The simplest supervised probe of the features the head is trained on.
- ``knn-tiles``: per category, a memory bank of the training normals' 21 crop embeddings; an
  image's score is the largest, over its crops, of the distance to the nearest normal crop of the
  same scale (PatchCore's idea, Roth et al., CVPR 2022, at crop level). No weights, no anomalous
  image.
- ``knn-patches``: PatchCore over the cached patch tokens (``cache.tokens``): per category, a
  memory bank of the training normals' tokens (a greedy k-center coreset of it when it is large,
  ``greedy_coreset``); each token's distance to its nearest bank token is the anomaly map, and
  the largest is the image score. Needs a cache with patch tokens.
- ``zero-shot-text``: RAML's s_text alone (``train.infer.text_score``): the zero-shot floor; where
  the cache has patch tokens, its map is the zero-shot text score of each token
  (``evaluate.localisation.zero_shot_token_scores``).

Embeddings are compared on the unit sphere (L2-normalised, as CLIP compares them and as s_text
does): the kNN distance is Euclidean between unit vectors, sqrt(2 − 2·cosine).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from raml.cache import SCALE_SLICES, FeatureTable
from raml.cache.reader import require_tokens, token_chunks
from raml.cache.tokens import EVAL_MASK_BYTES, TILES, add_tokens_command, token_grid
from raml.errors import UserError
from raml.evaluate.bootstrap_settings import DEFAULT_BOOTSTRAP
from raml.evaluate.localisation import (
    ZERO_SHOT_MAP,
    map_images,
    not_scored_block,
    pixel_block,
    score_tokens,
    zero_shot_token_scores,
)
from raml.evaluate.protocols import ImageList, held_out_relpaths, read_split_manifest
from raml.evaluate.results import MapSet, ScoredRun, config_entry, write_results
from raml.evaluate.run import backbone_fields
from raml.train.config import TrainConfig
from raml.train.infer import text_score, text_tokens
from raml.train.split import holdout_split, rows_for

BASELINES = ("linear", "knn-tiles", "knn-patches", "zero-shot-text")
TOKEN_BASELINES = ("knn-patches",)  # need a cache with patch tokens
# Logistic regression: scikit-learn's default C; classes weighted by their inverse frequency
# (the holdout training set has ~3 normal images per anomalous one in MVTec AD); lbfgs needs more
# than its default 100 iterations to converge on 512 standardised dimensions.
LINEAR_C = 1.0
LINEAR_CLASS_WEIGHT = "balanced"
LINEAR_MAX_ITER = 1000
# PatchCore's coreset (Roth et al., CVPR 2022, §3.2): greedy k-center selection in a random projection
# to 128 dimensions; 1 %, the smallest share the paper reports, keeps MVTec AD's category banks
# (~180,000 tokens) to seconds of selection each on a CPU.
CORESET_FROM = 20_000  # bank tokens above which the coreset is taken
CORESET_FRACTION = 0.01
CORESET_PROJECTION = 128
KNN_MAP = (
    "kNN over RAML's patch tokens: each token's distance to the nearest training-normal token of its "
    "category (PatchCore)"
)


def _unit(features) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def linear_probe(train_features, train_labels, test_features) -> np.ndarray:
    """Probability that each test image is anomalous, from a logistic regression fitted on the
    training images.

    Parameters
    ----------
    train_features : array of shape [n_train, D]
        The global crop's embedding of each training image.
    train_labels : array of shape [n_train]
        1 = anomalous; both classes must be present.
    test_features : array of shape [n_test, D]

    Returns
    -------
    array of shape [n_test]
    """
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=LINEAR_C, class_weight=LINEAR_CLASS_WEIGHT, max_iter=LINEAR_MAX_ITER)
    )
    model.fit(_unit(train_features), np.asarray(train_labels))
    return model.predict_proba(_unit(test_features))[:, 1]


def knn_crop_distances(normal_crops, test_crops) -> np.ndarray:
    """Distance of every test crop to the nearest normal crop of the same scale.

    Parameters
    ----------
    normal_crops : array of shape [n_normal, 21, D]
        The memory bank: every crop of the training normals (of one category).
    test_crops : array of shape [n_test, 21, D]

    Returns
    -------
    array of shape [n_test, 21]
        The image score is its maximum over the crops; the 4x4 tiles' distances form a map.
    """
    normal_crops, test_crops = _unit(normal_crops), _unit(test_crops)
    distances = np.empty(test_crops.shape[:2], np.float32)
    for rows in SCALE_SLICES:
        bank = normal_crops[:, rows].reshape(-1, normal_crops.shape[-1])
        queries = test_crops[:, rows].reshape(-1, test_crops.shape[-1])
        nearest, _ = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(bank).kneighbors(queries)
        distances[:, rows] = nearest[:, 0].reshape(len(test_crops), -1)
    return distances


def baseline_split(
    table: FeatureTable, split_from=None, split_seed: int | None = None, holdout_fraction: float | None = None
) -> tuple[np.ndarray, np.ndarray, ImageList]:
    """Training rows, held-out rows (sorted by relpath, as ``evaluate`` scores them) and the
    held-out image list.

    With ``split_from`` (a training run directory, its ``split.json`` or checkpoint) the split is
    that run's; else ``holdout_split`` with ``split_seed`` and ``holdout_fraction`` (default:
    ``TrainConfig``'s, so the same images as a ``train`` with default options).
    """
    if split_from is not None:
        if split_seed is not None or holdout_fraction is not None:
            raise UserError(
                "--split-from takes the split of that run; do not also pass --split-seed or --holdout-fraction"
            )
        manifest, source = read_split_manifest(split_from)
        heldout = held_out_relpaths(manifest, source)
        train = sorted(manifest["train"])
    else:
        seed = TrainConfig.split_seed if split_seed is None else split_seed
        fraction = TrainConfig.holdout_fraction if holdout_fraction is None else holdout_fraction
        split = holdout_split(table, seed, fraction)
        heldout, train = sorted(split.heldout_relpaths), sorted(split.train_relpaths)
        source = f"{table.cache_dir} (holdout split: seed {seed}, fraction {fraction})"
    image_list = ImageList("holdout", tuple(heldout), table.meta.get("dataset", {}), source)
    return rows_for(table, train), rows_for(table, heldout), image_list


def _by_category(table: FeatureTable, train_rows, test_rows):
    """(category, its training rows, the mask of its images in ``test_rows``) per test category."""
    for category in sorted(set(table.category[test_rows].tolist())):
        yield category, train_rows[table.category[train_rows] == category], table.category[test_rows] == category


def linear_scores(table: FeatureTable, train_rows, test_rows, per_category: bool = False) -> dict:
    """``linear_probe`` on the global crops: one model for all categories, or one per category."""
    global_crop = SCALE_SLICES[0].start
    groups = (
        _by_category(table, train_rows, test_rows)
        if per_category
        else [("all categories", train_rows, np.ones(len(test_rows), bool))]
    )
    scores = np.empty(len(test_rows))
    for name, train, test in groups:
        labels = table.label[train]
        if len(np.unique(labels)) < 2:
            found = f"are all {'anomalous' if labels[0] else 'normal'}" if labels.size else "are none"
            raise UserError(
                f"linear baseline: the training images of {name} {found}; a classifier needs both "
                "classes" + (" (drop --per-category)" if per_category else "")
            )
        scores[test] = linear_probe(
            table.features[train, global_crop], labels, table.features[test_rows[test], global_crop]
        )
    return {
        "scores": {"final": scores},
        "maps": None,
        "extra": {
            "method": "logistic regression on the global crop's CLIP embedding (scikit-learn)",
            "per_category": per_category,
            "C": LINEAR_C,
            "class_weight": LINEAR_CLASS_WEIGHT,
            "training_images": int(len(train_rows)),
        },
    }


def greedy_coreset(points: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of ``size`` of ``points`` [N, D] chosen by greedy k-center selection (PatchCore): start
    from a seeded random point, then repeatedly add the point farthest from those chosen, distances
    taken in a seeded Gaussian projection to ``CORESET_PROJECTION`` dimensions."""
    rng = np.random.default_rng(seed)
    dims = min(CORESET_PROJECTION, points.shape[1])
    projected = np.asarray(points, np.float32) @ (
        rng.standard_normal((points.shape[1], dims)).astype(np.float32) / np.sqrt(dims)
    )
    squared = np.einsum("nd,nd->n", projected, projected)
    chosen = [int(rng.integers(len(points)))]
    nearest = np.full(len(points), np.inf, np.float32)
    for _ in range(size - 1):
        latest = projected[chosen[-1]]
        np.minimum(nearest, squared - 2 * (projected @ latest) + latest @ latest, out=nearest)
        chosen.append(int(np.argmax(nearest)))
    return np.array(chosen)


def knn_patch_scores(table: FeatureTable, train_rows, test_rows) -> dict:
    """Per category, each test token's distance to the nearest token of the training normals'
    memory bank (its coreset when large); image score = the largest token distance."""
    require_tokens(table, np.concatenate([train_rows, test_rows]))
    distances = np.empty(table.token_defect[test_rows].shape, np.float32)
    masks = np.empty((len(test_rows), EVAL_MASK_BYTES), np.uint8)
    banks, seconds = {}, 0.0

    def nearest_distances(index):
        """A ``score_tokens`` scorer: each token's distance to the nearest of ``index``'s bank."""

        def score(tokens, _):
            return index.kneighbors(_unit(tokens.reshape(-1, tokens.shape[-1])))[0].reshape(len(tokens), -1)

        return score

    for category, train, test in _by_category(table, train_rows, test_rows):
        normal = train[table.label[train] == 0]
        if normal.size == 0:
            raise UserError(
                f"knn-patches baseline: category {category} has no normal training image for its memory bank"
            )
        start = time.perf_counter()
        bank = np.concatenate([tokens.reshape(-1, tokens.shape[-1]) for _, tokens, _ in token_chunks(table, normal)])
        size = max(1, int(CORESET_FRACTION * len(bank))) if len(bank) > CORESET_FROM else len(bank)
        if size < len(bank):
            bank = bank[greedy_coreset(bank, size)]
        index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(_unit(bank))
        (distances[test],), masks[test] = score_tokens(table, test_rows[test], [nearest_distances(index)])
        seconds += time.perf_counter() - start
        banks[category] = {
            "normal_images": int(len(normal)),
            "tokens": int(len(normal) * distances.shape[1]),
            "bank": int(size),
        }
    return {
        "scores": {"final": distances.max(axis=1).astype(float)},
        "token_scores": distances,
        "masks": masks,
        "map": KNN_MAP,
        "seconds": seconds,
        "extra": {
            "method": "kNN memory bank of normal patch tokens, per category (PatchCore)",
            "image_score": "the map's maximum: the largest token distance",
            "distance": "Euclidean between L2-normalised tokens",
            "coreset": f"greedy k-center, {CORESET_FRACTION:.0%} of banks over {CORESET_FROM:,} tokens, "
            f"chosen in a {CORESET_PROJECTION}-d random projection",
            "memory_bank": banks,
        },
    }


def knn_tiles_scores(table: FeatureTable, train_rows, test_rows) -> dict:
    """Per category, ``knn_crop_distances`` to the training normals; image score = the largest."""
    distances = np.empty((len(test_rows), table.features.shape[1]), np.float32)
    bank_images, bank_crops, seconds = 0, {}, 0.0
    for category, train, test in _by_category(table, train_rows, test_rows):
        normal = train[table.label[train] == 0]
        if normal.size == 0:
            raise UserError(f"knn-tiles baseline: category {category} has no normal training image for its memory bank")
        bank, queries = table.features[normal], table.features[test_rows[test]]
        start = time.perf_counter()
        distances[test] = knn_crop_distances(bank, queries)
        seconds += time.perf_counter() - start
        bank_images += len(normal)
        bank_crops[category] = int(bank.shape[0] * bank.shape[1])
    return {
        "scores": {"final": distances.max(axis=1).astype(float)},
        "seconds": seconds,
        "extra": {
            "method": "kNN memory bank of normal crops, per category and scale (PatchCore at crop level)",
            "distance": "Euclidean between L2-normalised embeddings",
            "memory_bank": {
                "normal_images": bank_images,
                "crops": int(sum(bank_crops.values())),
                "crops_per_category": bank_crops,
            },
        },
    }


def zero_shot_text_scores(table: FeatureTable, test_rows) -> dict:
    """RAML's s_text of the test images (zero-shot: nothing is fitted); where they have patch tokens,
    each token's zero-shot score as the map."""
    subset = table.select(test_rows)
    result = {
        "scores": {"final": np.asarray(text_score(subset.features[:, 0], subset.text, subset.category), float)},
        "map": ZERO_SHOT_MAP,
        "extra": {
            "method": "zero-shot CLIP: s_text of the global crop (RAML's text score alone)",
            "image_score": "s_text",
        },
    }
    if subset.has_tokens.all() and len(subset):
        names = sorted(set(subset.category.tolist()))
        bank = text_tokens(table.text, names)
        (result["token_scores"],), result["masks"] = score_tokens(
            table,
            test_rows,
            [lambda tokens, rows: zero_shot_token_scores(tokens, bank, np.searchsorted(names, table.category[rows]))],
        )
    return result


def run_feature_baseline(
    name: str,
    table: FeatureTable,
    out_dir,
    *,
    split_from=None,
    split_seed: int | None = None,
    holdout_fraction: float | None = None,
    per_category: bool = False,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
) -> tuple[Path, dict, dict]:
    """Score the held-out images with baseline ``name``; write results.json, scores.csv and (the
    map kinds, on a cache with patch tokens) anomaly_maps.npz into ``out_dir``.

    Returns the results path, ``{config: entry}`` and what the baseline reported (for the kNN
    baselines, the scoring time in ``seconds``).
    """
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if per_category and name != "linear":
        raise UserError("--per-category applies to the linear baseline only")
    train_rows, test_rows, image_list = baseline_split(table, split_from, split_seed, holdout_fraction)
    if name == "linear":
        result = linear_scores(table, train_rows, test_rows, per_category)
    elif name == "knn-tiles":
        result = knn_tiles_scores(table, train_rows, test_rows)
    elif name == "knn-patches":
        result = knn_patch_scores(table, train_rows, test_rows)
    else:
        result = zero_shot_text_scores(table, test_rows)
    config = "linear-per-category" if per_category else name
    subset = table.select(test_rows)
    run = ScoredRun(
        config, None, name, subset.category, subset.relpath, subset.defect_type, subset.label, result["scores"]
    )
    pixel, maps = None, None
    if "token_scores" in result:
        grids = token_grid(result["token_scores"], table.token_setting["per_tile"])
        pixel = pixel_block(
            [grids],
            map_images(subset, result["masks"]),
            result["map"],
            n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed,
        )
        maps = {config: MapSet(subset.relpath, subset.mask_relpath, grids, TILES, result["map"])}
    elif "map" in result:
        pixel = not_scored_block(
            result["map"],
            "the cache has no patch tokens for these images (add them: "
            f"{add_tokens_command(table.meta, table.cache_dir)})",
            subset.category,
        )
    entry = config_entry(
        [run],
        image_list.describe(),
        backbone_fields(table.meta),
        n_resamples=n_resamples,
        bootstrap_seed=bootstrap_seed,
        pixel=pixel,
        extra={**result["extra"], "cache_dir": str(table.cache_dir)},
    )
    path = write_results(out_dir, {config: entry}, [run], maps=maps)
    return path, {config: entry}, result
