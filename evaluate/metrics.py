"""Image-level metrics. scikit-learn does the arithmetic; these functions check the inputs."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = anomalous), in [0, 1]."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC needs both normal and anomalous images; this set has only "
                         f"{'anomalous' if labels.size and labels[0] else 'normal'} ones")
    return float(roc_auc_score(labels, scores))
