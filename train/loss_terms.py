"""The formula pieces both losses are built from (``train/loss.py``, this project's MACCL, and
``train/original_loss.py``, the original release's): the adaptive margin, the center and margin
terms, and the per-category difficulty weight (docs/method.md#maccl-the-loss,
docs/method.md#the-margin, docs/method.md#auto-difficulty)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_margin(margin_base, lambda_sigma, sigma, lambda_res, resolution_penalty):
    """m = m_base + λ_σ·σ + λ_res·penalty (works on floats and tensors)."""
    return margin_base + lambda_sigma * sigma + lambda_res * resolution_penalty


def difficulty_weights(category_loss: torch.Tensor, seen: torch.Tensor, scale=0.5, low=0.5, high=2.0):
    """w_cat = 1 + scale·(L_cat − L_global)/L_global, clipped to [low, high] (docs/method.md#auto-difficulty).

    ``category_loss`` [C] holds the per-category loss EMAs; L_global is their mean over the
    categories ``seen`` so far. Unseen categories get weight 1.
    """
    seen = seen.to(category_loss.dtype)
    global_loss = (category_loss * seen).sum() / seen.sum().clamp(min=1)
    relative = (category_loss - global_loss) / global_loss.clamp(min=1e-12)
    weights = (1 + scale * relative).clamp(low, high)
    return torch.where(seen > 0, weights, torch.ones_like(weights))


def center_terms(features, normal, center):
    """Per image ‖f − c‖² for normal images, 0 for anomalous ones."""
    return (features - center).pow(2).sum(dim=1) * normal


def margin_terms(features, anomalous, center, margins):
    """Per image relu(m − ‖f − c‖) for anomalous images, 0 for normal ones."""
    return F.relu(margins - (features - center).norm(dim=1)) * anomalous
