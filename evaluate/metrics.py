"""Image-level and coarse pixel-level metrics. scikit-learn does the arithmetic; these functions
check the inputs and fix the conventions (1 = anomalous, higher score = more anomalous).

Every function that needs both classes raises ``ValueError`` with a plain message when a set has
only one: a category whose held-out images are all normal has no AUROC, and saying 0.5 or
crashing later would both mislead.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    if labels.shape[-1] != scores.shape[-1]:
        raise ValueError(f"{labels.shape[-1]} labels but {scores.shape[-1]} scores")
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC needs both normal and anomalous images; this set has only "
                         f"{'anomalous' if labels.size and labels[0] else 'normal'} ones")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = anomalous), in [0, 1]."""
    labels, scores = _labels_scores(labels, scores)
    return float(roc_auc_score(labels, scores))


def average_precision(labels, scores) -> float:
    """Average precision (area under the precision-recall curve, step-wise as scikit-learn)."""
    labels, scores = _labels_scores(labels, scores)
    return float(average_precision_score(labels, scores))


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over all thresholds and that threshold: an image is called anomalous when
    its score is >= the threshold."""
    labels, scores = _labels_scores(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision, recall) pair has no threshold (recall 0); drop it.
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def bootstrap_auroc_ci(labels, scores, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                       level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC, resampling images.

    ``scores`` is [n] or [runs, n] (several seeds scored on the same images): then each resample
    draws one set of images and the statistic is the mean AUROC over the runs, so the interval
    is that of the seed-averaged AUROC under image sampling. Resampling is stratified (normal and
    anomalous images drawn separately, counts kept): held-out sets are tiny, and an unstratified
    resample of toothbrush's 3 normal images would often have none.

    Computed without re-sorting each resample: the AUROC of a resample is the Mann–Whitney
    statistic Σ_ij a_i·b_j·W_ij / (n₁·n₀), with a and b how often each anomalous and each normal image
    was drawn and W_ij = 1, ½ or 0 as anomalous image i scores above, level with or below normal
    image j. The same value as ``roc_auc_score`` on the resampled images (ties count ½), without
    its per-call cost (a 1,000-resample CI of a category took seconds, now milliseconds).
    """
    labels, scores = _labels_scores(labels, scores)
    scores = scores.reshape(-1, labels.size)
    counts = _stratified_counts(labels, n_resamples, seed)
    negative, positive = (np.flatnonzero(labels == value) for value in (0, 1))
    statistics = _resampled_aurocs(scores[:, positive], scores[:, negative], *counts).mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def _stratified_counts(labels: np.ndarray, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each anomalous and each normal image is drawn in each stratified resample:
    ([R, n₁], [R, n₀]). Per resample the normal images are drawn first, then the anomalous ones."""
    rng = np.random.default_rng(seed)
    sizes = [int((labels == value).sum()) for value in (0, 1)]
    counts = [np.empty((n_resamples, size)) for size in sizes]
    for i in range(n_resamples):
        for size, drawn in zip(sizes, counts):
            drawn[i] = np.bincount(rng.choice(size, size=size, replace=True), minlength=size)
    return counts[1], counts[0]


def _resampled_aurocs(positive_scores, negative_scores, positive_counts, negative_counts) -> np.ndarray:
    """[R, runs] AUROC of each resample (counts [R, n₁] and [R, n₀]) for each run's scores
    ([runs, n₁] anomalous, [runs, n₀] normal)."""
    wins = ((positive_scores[:, :, None] > negative_scores[:, None, :])
            + 0.5 * (positive_scores[:, :, None] == negative_scores[:, None, :]))      # [runs, n₁, n₀]
    weighted = np.einsum("rp,kpn->rkn", positive_counts, wins)                        # [R, runs, n₀]
    return np.einsum("rkn,rn->rk", weighted, negative_counts) / (positive_counts.shape[1] * negative_counts.shape[1])


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
