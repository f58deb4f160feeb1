"""Image-level and pixel-level metrics. scikit-learn does the image arithmetic (the bootstraps:
scipy's ranks, the same AUROC vectorised over resamples); these functions check the inputs and
fix the conventions (1 = anomalous, higher score = more anomalous). Pixel metrics (pixel AUROC,
AUPRO, pixel F1-max) are computed from per-image counts of pixels per score bin
(``PixelCounts``), so that their bootstrap over images is a matrix product.

Every function that needs both classes raises ``ValueError`` with a plain message when a set has
only one: a category whose held-out images are all normal has no AUROC, and saying 0.5 or
crashing later would both mislead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from raml.evaluate.bootstrap_settings import CI_LEVEL, DEFAULT_BOOTSTRAP
from raml.train.thresholds import labels_and_scores


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
    return np.stack(
        [
            np.concatenate([rng.choice(group, size=group.size, replace=True) for group in groups])
            for _ in range(n_resamples)
        ]
    )


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
    ranks = rankdata(scores[:, index], axis=-1)  # [runs, R, n]
    rank_sum = ranks[..., n_normal:].sum(axis=-1)
    return (rank_sum - n_anomalous * (n_anomalous + 1) / 2) / (n_normal * n_anomalous)


def _percentile_interval(statistics: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_auroc_ci(
    labels, scores, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL
) -> tuple[float, float]:
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


def paired_bootstrap_auroc_difference(
    labels,
    scores_a,
    scores_b,
    groups=None,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float, float]:
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


def bootstrap_mean_auroc_ci(
    labels, scores, groups=None, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL
) -> tuple[float, float, float]:
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
        original = np.argsort(group_labels, kind="stable")[None]  # the images themselves, normals first
        index = _stratified_resamples(group_labels, n_resamples, rng)
        for k, (_, group_scores) in enumerate(checked):
            observed[k] += _resampled_aurocs(group_scores, original, n_normal).mean(axis=0)[0]
            resampled[k] += _resampled_aurocs(group_scores, index, n_normal).mean(axis=0)
    return observed / len(names), resampled / len(names)


PIXEL_THRESHOLDS = 4096  # thresholds per pixel curve, at most: the scores' quantiles (every distinct score when fewer)
AUPRO_FPR_LIMIT = 0.3  # MVTec AD's AUPRO: the PRO curve integrated up to this false-positive rate, divided by it
REGION_CONNECTIVITY = np.ones((3, 3), bool)  # defect regions are 8-connected, as in MVTec AD's evaluation code


@dataclass
class PixelCounts:
    """One map's pixels per image, counted per score bin: all that pixel AUROC, AUPRO and F1-max need.

    Bin b holds the scores from threshold ``thresholds[b]`` up to the next one, so "pixels ≥ a
    threshold" are the bins from b up: the curves are exact at every threshold, and exact overall
    when every distinct score is a threshold (at most ``PIXEL_THRESHOLDS`` distinct scores). Every
    metric is a function of sums over images, so a bootstrap resample of images is a weighted sum.
    """

    thresholds: np.ndarray  # [bins] ascending
    normal: np.ndarray  # [n, bins] defect-free pixels of each image in each bin
    defective: np.ndarray  # [n, bins] defective pixels
    overlap: np.ndarray  # [n, bins] Σ over the image's defect regions of (its pixels in the bin) / (its size)
    regions: np.ndarray  # [n] connected defect regions of each image

    @property
    def anomalous(self) -> np.ndarray:
        """[n] whether each image has defective pixels (the classes of a stratified resample)."""
        return self.regions > 0


def pixel_counts(maps: np.ndarray, masks: np.ndarray) -> PixelCounts:
    """``PixelCounts`` of anomaly ``maps`` [n, H, W] (higher = more anomalous) against defect
    ``masks`` [n, H, W] bool. ``ValueError`` without defective or without defect-free pixels."""
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks, bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be [n, H, W]")
    if not masks.any() or masks.all():
        raise ValueError("pixel metrics need both defective and defect-free pixels (a defect mask)")
    if not np.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or infinity")
    distinct = np.unique(maps)
    thresholds = (
        distinct
        if len(distinct) <= PIXEL_THRESHOLDS
        else np.unique(np.quantile(maps, np.linspace(0, 1, PIXEL_THRESHOLDS), method="inverted_cdf"))
    )
    bins, n = len(thresholds), len(maps)
    index = np.searchsorted(thresholds, maps, side="right").reshape(n, -1) - 1 + (np.arange(n) * bins)[:, None]
    flat_masks = masks.reshape(n, -1)
    weights = np.zeros(flat_masks.shape)
    regions = np.zeros(n, np.int64)
    for i, mask in enumerate(masks):
        labels, regions[i] = ndimage.label(mask, structure=REGION_CONNECTIVITY)
        sizes = np.bincount(labels.ravel())
        weights[i] = np.where(labels.ravel() > 0, 1.0 / sizes[labels.ravel()], 0.0)

    def count(selected, values=None):
        return np.bincount(
            index[selected], values[selected] if values is not None else None, minlength=n * bins
        ).reshape(n, bins)

    return PixelCounts(
        thresholds=thresholds,
        normal=count(~flat_masks),
        defective=count(flat_masks),
        overlap=count(flat_masks, weights),
        regions=regions,
    )


def pixel_metrics(
    counts: PixelCounts, image_weights: np.ndarray | None = None, fpr_limit: float = AUPRO_FPR_LIMIT
) -> dict:
    """Pixel AUROC, AUPRO (up to ``fpr_limit``) and pixel F1-max of the images of ``counts``, each
    image counted ``image_weights`` times (default once; [R, n] gives R sets of images, e.g.
    bootstrap resamples, and arrays [R] of each metric).

    AUPRO as MVTec AD defines it: at each threshold, the false-positive rate over all defect-free
    pixels and the PRO, the mean over all connected defect regions of the share of the region at or
    above the threshold; the PRO curve integrated over FPR from 0 to ``fpr_limit`` (trapezoids, the
    last point interpolated at the limit) and divided by ``fpr_limit``. F1-max: the best F1 of
    "pixel ≥ threshold" over the thresholds. Pixel AUROC: the area under the pixel ROC (ties ½).
    """
    weights = np.ones(len(counts.regions)) if image_weights is None else np.asarray(image_weights, float)

    def above(per_image):  # Σ over images, then over the bins at or above each threshold, highest first
        return np.cumsum((weights @ per_image)[..., ::-1], axis=-1)

    false_positives, true_positives, overlap = above(counts.normal), above(counts.defective), above(counts.overlap)
    zero = np.zeros((*false_positives.shape[:-1], 1))
    fpr = np.concatenate([zero, false_positives / false_positives[..., -1:]], axis=-1)
    tpr = np.concatenate([zero, true_positives / true_positives[..., -1:]], axis=-1)
    pro = np.concatenate([zero, overlap / (weights @ counts.regions)[..., None]], axis=-1)
    f1 = 2 * true_positives / (true_positives + false_positives + true_positives[..., -1:])
    return {
        "pixel_auroc": np.sum(np.diff(fpr) * (tpr[..., 1:] + tpr[..., :-1]) / 2, axis=-1),
        "aupro": _area_up_to(fpr, pro, fpr_limit) / fpr_limit,
        "pixel_f1_max": f1.max(axis=-1),
    }


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Trapezoidal area under y(x) (x ascending along the last axis) from x[0] to ``limit``, y
    interpolated linearly at the limit."""
    left, right = x[..., :-1], x[..., 1:]
    end = np.minimum(right, limit)
    width = np.clip(end - left, 0, None)
    slope = np.divide(y[..., 1:] - y[..., :-1], right - left, out=np.zeros_like(width), where=right > left)
    return np.sum(width * (2 * y[..., :-1] + slope * width) / 2, axis=-1)


def bootstrap_pixel_ci(
    counts_by_run: list[PixelCounts], n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = CI_LEVEL
) -> dict:
    """Percentile bootstrap CIs of each pixel metric (``pixel_metrics``) averaged over runs (seeds)
    scored on the same images: ``{metric: (low, high)}``. Images are resampled, stratified by whether
    they have a defect (as ``bootstrap_auroc_ci``), one set of images per resample for every run."""
    anomalous = counts_by_run[0].anomalous.astype(int)
    index = _stratified_resamples(anomalous, n_resamples, np.random.default_rng(seed))
    weights = np.zeros((n_resamples, len(anomalous)))
    np.add.at(weights, (np.arange(n_resamples)[:, None], index), 1.0)
    resampled = [pixel_metrics(counts, weights) for counts in counts_by_run]
    return {
        name: _percentile_interval(np.mean([values[name] for values in resampled], axis=0), level)
        for name in resampled[0]
    }
