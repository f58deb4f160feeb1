"""Image-level and coarse pixel-level metrics. scikit-learn does the arithmetic (the bootstraps:
scipy's ranks, the same AUROC vectorised over resamples); these functions check the inputs and
fix the conventions (1 = anomalous, higher score = more anomalous).

Every function that needs both classes raises ``ValueError`` with a plain message when a set has
only one: a category whose held-out images are all normal has no AUROC, and saying 0.5 or
crashing later would both mislead.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from train.thresholds import labels_and_scores

DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = anomalous), in [0, 1]."""
    labels, scores = labels_and_scores(labels, scores)
    return float(roc_auc_score(labels, scores))


def average_precision(labels, scores) -> float:
    """Average precision (area under the precision-recall curve, step-wise as scikit-learn)."""
    labels, scores = labels_and_scores(labels, scores)
    return float(average_precision_score(labels, scores))


def _stratified_resamples(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n] image indices: each row draws the normal images, then the anomalous ones,
    with replacement, keeping both counts. So the resampled labels of every row are the same:
    ``n_normal`` zeros, then ones."""
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    return np.stack([np.concatenate([rng.choice(group, size=group.size, replace=True) for group in groups])
                     for _ in range(n_resamples)])


def _resampled_aurocs(scores: np.ndarray, index: np.ndarray, n_normal: int) -> np.ndarray:
    """AUROC of every run (``scores`` [runs, n]) on every resample (``index`` from
    ``_stratified_resamples``): [runs, n_resamples].

    As the Mann–Whitney statistic, which is the AUROC with ties counted ½ (the same number
    ``roc_auc_score`` gives): (sum of the anomalous images' ranks − n₁(n₁+1)/2) / (n₀·n₁), ranks
    averaged over ties. Vectorised over resamples, which is what makes thousands of resamples of
    many runs cheap.
    """
    from scipy.stats import rankdata

    n_anomalous = index.shape[1] - n_normal
    ranks = rankdata(scores[:, index], axis=-1)                               # [runs, R, n]
    rank_sum = ranks[..., n_normal:].sum(axis=-1)
    return (rank_sum - n_anomalous * (n_anomalous + 1) / 2) / (n_normal * n_anomalous)


def _percentile_interval(statistics: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_auroc_ci(labels, scores, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                       level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC, resampling images.

    ``scores`` is [n] or [runs, n] (several seeds scored on the same images): then each resample
    draws one set of images and the statistic is the mean AUROC over the runs, so the interval
    is that of the seed-averaged AUROC under image sampling. Resampling is stratified (normal and
    anomalous images drawn separately, counts kept): held-out sets are tiny, and an unstratified
    resample of toothbrush's 3 normal images would often have none.
    """
    labels, scores = labels_and_scores(labels, scores)
    scores = scores.reshape(-1, labels.size)
    index = _stratified_resamples(labels, n_resamples, np.random.default_rng(seed))
    statistics = _resampled_aurocs(scores, index, int((labels == 0).sum())).mean(axis=0)
    return _percentile_interval(statistics, level)


def paired_bootstrap_auroc_difference(labels, scores_a, scores_b, groups=None, n_resamples: int = DEFAULT_BOOTSTRAP,
                                      seed: int = 0, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """AUROC of configuration A minus that of B, scored on the same images, with a paired
    percentile bootstrap confidence interval: ``(difference, low, high)``.

    Parameters
    ----------
    labels : array of shape [n]
        1 = anomalous.
    scores_a, scores_b : arrays of shape [n] or [runs, n]
        The two configurations' scores of the same n images (several runs: seeds; A and B may
        have different numbers of runs). A configuration's AUROC is the mean over its runs.
    groups : array of shape [n], optional
        Category of each image. Given, a configuration's statistic is the mean over categories of
        the per-category AUROC (what results files report as ``mean_auroc``), and images are
        resampled within each category. Every category needs both classes.
    n_resamples, seed, level
        As ``bootstrap_auroc_ci``.

    Each resample draws one set of image indices, used for both configurations (so what the
    images have in common cancels out of the difference: a configuration against itself, or
    against any increasing transform of its scores, gives exactly 0 on every resample), stratified
    by class as in ``bootstrap_auroc_ci``, and within each category.
    """
    observed, resampled = _category_mean_aurocs(labels, [scores_a, scores_b], groups, n_resamples, seed)
    low, high = _percentile_interval(resampled[0] - resampled[1], level)
    return float(observed[0] - observed[1]), low, high


def bootstrap_mean_auroc_ci(labels, scores, groups=None, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                            level: float = CI_LEVEL) -> tuple[float, float, float]:
    """``(statistic, low, high)``: the mean over categories (``groups``) of the per-category AUROC —
    what results files report as ``mean_auroc`` — with its percentile bootstrap CI; images are
    resampled within each category and class, as in ``paired_bootstrap_auroc_difference`` (same
    seed, same resamples). ``scores`` [n] or [runs, n]: the AUROC of a category is the mean over runs."""
    observed, resampled = _category_mean_aurocs(labels, [scores], groups, n_resamples, seed)
    low, high = _percentile_interval(resampled[0], level)
    return float(observed[0]), low, high


def _category_mean_aurocs(labels, score_sets, groups, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each set of scores ([n] or [runs, n], all of the same n images): the category-mean AUROC
    on the images themselves [S], and on each stratified resample [S, n_resamples]. Every set is
    scored on the same resamples."""
    labels = np.asarray(labels).astype(int)
    score_sets = [np.asarray(s, float) for s in score_sets]
    if any(s.shape[-1] != labels.size for s in score_sets):
        raise ValueError(f"{labels.size} labels but scores of {[s.shape[-1] for s in score_sets]} images")
    score_sets = [s.reshape(-1, labels.size) for s in score_sets]
    groups = np.zeros(labels.size, int) if groups is None else np.asarray(groups)
    names = sorted(set(groups.tolist()))
    rng = np.random.default_rng(seed)
    observed, resampled = np.zeros(len(score_sets)), np.zeros((len(score_sets), n_resamples))
    for name in names:
        rows = np.flatnonzero(groups == name)
        try:
            checked = [labels_and_scores(labels[rows], s[:, rows]) for s in score_sets]
        except ValueError as err:
            if len(names) == 1:
                raise
            raise ValueError(f"category {name}: {err}") from err
        group_labels = checked[0][0]
        n_normal = int((group_labels == 0).sum())
        original = np.argsort(group_labels, kind="stable")[None]      # the images themselves, normals first
        index = _stratified_resamples(group_labels, n_resamples, rng)
        for k, (_, group_scores) in enumerate(checked):
            observed[k] += _resampled_aurocs(group_scores, original, n_normal).mean(axis=0)[0]
            resampled[k] += _resampled_aurocs(group_scores, index, n_normal).mean(axis=0)
    return observed / len(names), resampled / len(names)


def weighted_pixel_auroc(tile_scores, anomalous_pixels, normal_pixels) -> float:
    """Pixel AUROC of a piecewise-constant anomaly map, computed exactly from its tiles.

    Every pixel of a tile has the tile's score, so the pixel-level ROC equals a ROC over tiles
    in which each tile counts once as anomalous with weight = its defective pixels and once as
    normal with weight = its other pixels. This avoids materialising full-resolution maps.
    """
    tile_scores = np.asarray(tile_scores, float).ravel()
    positive = np.asarray(anomalous_pixels, float).ravel()
    negative = np.asarray(normal_pixels, float).ravel()
    if positive.sum() == 0 or negative.sum() == 0:
        raise ValueError("pixel AUROC needs both defective and defect-free pixels")
    labels = np.concatenate([np.ones_like(tile_scores), np.zeros_like(tile_scores)])
    weights = np.concatenate([positive, negative])
    keep = weights > 0
    return float(roc_auc_score(labels[keep], np.concatenate([tile_scores, tile_scores])[keep],
                               sample_weight=weights[keep]))
