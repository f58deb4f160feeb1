"""Decision thresholds: the F1-max threshold of s_final per category, calibrated on a run's own
training images when it is trained, and the F1-max metric it rests on (evaluate's metrics use the
same function, so a threshold and the F1-max a report shows cannot disagree).

Conventions: 1 = anomalous, higher score = more anomalous, an image is called anomalous when its
score is >= the threshold.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve

from raml.errors import UserError

CALIBRATION_SET = (
    "the run's own training images of the category (optimistic: the head was fitted on them; "
    "held-out images are never used, they are what evaluate scores)"
)


def labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` (1 = anomalous) as int and ``scores`` as float arrays, checked: the same length, both
    classes present, every score finite (``ValueError`` with a plain message otherwise)."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    if labels.shape[-1] != scores.shape[-1]:
        raise ValueError(f"{labels.shape[-1]} labels but {scores.shape[-1]} scores")
    if len(np.unique(labels)) < 2:
        raise ValueError(
            "AUROC needs both normal and anomalous images; this set has only "
            f"{'anomalous' if labels.size and labels[0] else 'normal'} ones"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over all thresholds and that threshold: an image is called anomalous when
    its score is >= the threshold."""
    labels, scores = labels_and_scores(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision, recall) pair has no threshold (recall 0); drop it.
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of "anomalous when score ≥ threshold" on these images (None where
    undefined: precision when nothing is flagged, recall without anomalous images)."""
    flagged = scores >= threshold
    true_positives = int((flagged & (labels == 1)).sum())
    precision = true_positives / int(flagged.sum()) if flagged.any() else None
    recall = true_positives / int((labels == 1).sum()) if (labels == 1).any() else None
    f1 = (
        None
        if precision is None or recall is None
        else (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    )
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "normal": int((labels == 0).sum()),
        "anomalous": int((labels == 1).sum()),
    }


def calibrate_thresholds(labels, scores, categories) -> dict:
    """Decision thresholds of s_final, one per category, fitted on the calibration images given.

    Each category's threshold is its F1-max threshold (``f1_max``: anomalous
    when score ≥ threshold), stored with its precision, recall and F1 on those images and their
    class counts. A category with one class only has no F1-max (``threshold`` None, with the
    reason); the ``pooled`` threshold (F1-max over all the images) is what ``predict`` uses for it
    and for categories the run was not trained on. ``fit`` calls this on the training images
    (``CALIBRATION_SET`` says why those).

    Returns ``{"set", "rule", "pooled": {...}, "categories": {category: {...}}}``.
    """
    labels, scores, categories = np.asarray(labels).astype(int), np.asarray(scores, float), np.asarray(categories)
    if len(np.unique(labels)) < 2:
        raise UserError("calibrating a threshold needs both normal and anomalous images")
    per_category = {}
    for category in sorted(set(categories.tolist())):
        here = categories == category
        if len(np.unique(labels[here])) < 2:
            only = "anomalous" if labels[here][0] else "normal"
            per_category[category] = {
                "threshold": None,
                "normal": int((labels[here] == 0).sum()),
                "anomalous": int((labels[here] == 1).sum()),
                "reason": f"only {only} calibration images: no F1-max; the pooled threshold applies",
            }
            continue
        per_category[category] = operating_point(labels[here], scores[here], f1_max(labels[here], scores[here])[1])
    return {
        "set": CALIBRATION_SET,
        "rule": "F1-max of s_final, anomalous when s_final >= threshold",
        "pooled": operating_point(labels, scores, f1_max(labels, scores)[1]),
        "categories": per_category,
    }


def threshold_lines(calibration: dict) -> list[str]:
    """The calibration as lines for a terminal: each category's threshold with its precision and
    recall on the calibration images, and the pooled threshold."""
    lines = [f"thresholds ({calibration['rule']}; calibrated on {calibration['set']}):"]
    for name, point in [*calibration["categories"].items(), ("(pooled)", calibration["pooled"])]:
        counts = f"{point.get('normal', '?')} normal, {point.get('anomalous', '?')} anomalous"
        if point.get("threshold") is None:
            lines.append(f"  {name:<14} –       ({counts}): {point['reason']}")
        elif "precision" in point:
            lines.append(
                f"  {name:<14} {point['threshold']:.4f}  precision {point['precision']:.3f}  "
                f"recall {point['recall']:.3f}  ({counts})"
            )
        else:
            lines.append(f"  {name:<14} {point['threshold']:.4f}")
    return lines


def threshold_for(checkpoint, category: str) -> float:
    """The decision threshold for ``category``: its own calibrated threshold when the checkpoint has
    one (``train.infer.calibrate_thresholds``), else the pooled one (``threshold_note`` says why)."""
    own = checkpoint.thresholds["categories"].get(category, {}).get("threshold")
    return float(checkpoint.thresholds["pooled"]["threshold"] if own is None else own)


def pooled_reason(checkpoint, category: str) -> str | None:
    """Why ``category`` has no decision threshold of its own in ``checkpoint``, or None when it has."""
    calibration = checkpoint.thresholds
    own = calibration["categories"].get(category)
    if own is not None and own.get("threshold") is not None:
        return None
    if own is not None:
        return own["reason"]
    if not calibration["categories"]:
        return f"this checkpoint has one threshold ({calibration['set']})"
    return f"the run was not trained on {category!r}"


def threshold_note(checkpoint, category: str) -> str | None:
    """Why ``category`` gets the pooled threshold rather than its own, or None when it has its own."""
    reason = pooled_reason(checkpoint, category)
    return (
        None
        if reason is None
        else f"{category}: the pooled threshold {threshold_for(checkpoint, category):.4f} applies: {reason}"
    )


def threshold_source(checkpoint, category: str) -> str:
    """Where ``threshold_for(checkpoint, category)`` comes from, in a few words (``predict`` prints it)."""
    reason = pooled_reason(checkpoint, category)
    return f"{category}'s own, F1-max on its training images" if reason is None else f"pooled, as {reason}"
