"""MACCL, the Margin-Aware Center-Contrastive loss (SPEC.md §4–6), plus BCE on the visual logit.

Feature scale: the head's MACCL feature is L2-normalised, so every distance lies in [0, 2] and a
margin of 0.905 (the README's worked example) is a real distance, about 54° apart on the sphere.

State (saved in checkpoints; never trained by gradient):

- ``center``: running center c of the normal features, an EMA (``center_momentum``) of each
  batch's mean normal feature. Not re-normalised: it is a mean of unit vectors.
- ``sigma``: σ, the spread of the normal features: an EMA (``sigma_momentum``) of each batch's
  total standard deviation sqrt(Σ_i ‖f_i − f̄‖² / (n − 1)) over its n ≥ 2 normal features (the
  root of the covariance trace: the typical distance of a normal feature from its mean, on the
  same scale as the margin).
- ``difficulty``: per-category EMA (``difficulty_momentum``) of the loss (SPEC §6).

Both ``center`` and ``sigma`` are initialised from all training normals under the initial
weights (``MACCLoss.initialise``), so the first batch already has a meaningful center.

Each image carries a resolution penalty max(0, 1 − r/r_max) (``resolution_penalty``); its margin
is m = m_base + λ_σ·σ + λ_res·penalty, so the adaptive margin is per image. Fixed and strong
presets set both λ to 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TERMS = ("loss", "center", "margin", "contrastive", "bce")


def adaptive_margin(margin_base, lambda_sigma, sigma, lambda_res, resolution_penalty):
    """m = m_base + λ_σ·σ + λ_res·penalty (works on floats and tensors)."""
    return margin_base + lambda_sigma * sigma + lambda_res * resolution_penalty


def resolution_penalty(input_size: int, r_max) -> np.ndarray:
    """1 − r/r_max, floored at 0: an image no larger than the model input loses nothing to resizing.

    >>> float(resolution_penalty(224, 900))
    0.7511111111111111
    """
    return np.maximum(0.0, 1.0 - float(input_size) / np.asarray(r_max, dtype=np.float64))


def image_r_max(height, width, category, mode) -> np.ndarray:
    """r_max per image: its own max(height, width) ('image'), its category's mean of that
    ('category'), or a constant number of pixels (900 reproduces the original release)."""
    size = np.maximum(np.asarray(height), np.asarray(width)).astype(np.float64)
    if mode == "image":
        return size
    if mode == "category":
        category = np.asarray(category)
        means = {c: size[category == c].mean() for c in np.unique(category)}
        return np.array([means[c] for c in category], dtype=np.float64)
    return np.full(len(size), float(mode))


def difficulty_weights(category_loss: torch.Tensor, seen: torch.Tensor, scale=0.5, low=0.5, high=2.0):
    """w_cat = 1 + scale·(L_cat − L_global)/L_global, clipped to [low, high] (SPEC §6).

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


def contrastive_terms(features, labels, temperature):
    """Supervised contrastive loss (Khosla et al. 2020) per anchor; 0 for an anchor without positives.

    For anchor i: −mean over positives p (same label, p ≠ i) of log softmax_{a ≠ i}(f_i·f_a / τ)[p].
    Returns ``(terms, has_positive)``.
    """
    logits = features @ features.T / temperature
    self_mask = torch.eye(len(features), dtype=torch.bool, device=features.device)
    log_norm = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(dim=1)
    terms = -((logits - log_norm) * positives).sum(dim=1) / count.clamp(min=1)
    return terms, (count > 0).to(features.dtype)


class MACCLoss(nn.Module):
    """``α·L_center + β·L_margin + γ·L_contrastive + bce_weight·L_bce``, each term a mean over the
    images it concerns (normal / anomalous / anchors with a positive / all), every image weighted
    by its category's difficulty weight. ``forward`` also updates the state (after computing the
    loss with the state from before the batch).
    """

    def __init__(self, config, n_categories: int, feature_dim: int):
        super().__init__()
        self.config = config
        self.register_buffer("center", torch.zeros(feature_dim))
        self.register_buffer("sigma", torch.zeros(()))
        self.register_buffer("difficulty", torch.zeros(n_categories))
        self.register_buffer("difficulty_seen", torch.zeros(n_categories, dtype=torch.bool))

    @torch.no_grad()
    def initialise(self, normal_features: torch.Tensor) -> None:
        """Center and σ from the normal features of the whole training set under the initial head."""
        self.center.copy_(normal_features.mean(dim=0))
        self.sigma.copy_(_normal_spread(normal_features, torch.ones(len(normal_features)))[1])

    def margins(self, resolution_penalty: torch.Tensor) -> torch.Tensor:
        """Each image's margin under the current σ."""
        c = self.config
        return adaptive_margin(c.margin_base, c.lambda_sigma, self.sigma, c.lambda_res, resolution_penalty)

    def weights(self) -> torch.Tensor:
        c = self.config
        return difficulty_weights(self.difficulty, self.difficulty_seen, c.difficulty_scale, c.difficulty_min,
                                  c.difficulty_max)

    def forward(self, features, logits, labels, category, resolution_penalty):
        """``labels`` float [B] (1 anomalous), ``category`` long [B], ``resolution_penalty`` [B].

        Returns ``(loss, terms)``: the scalar to minimise and a detached [5] tensor of
        ``TERMS`` (total, center, margin, contrastive, bce) for logging.
        """
        c = self.config
        anomalous, normal = labels, 1 - labels
        weights = self.weights()[category]
        center = center_terms(features, normal, self.center)
        margin = margin_terms(features, anomalous, self.center, self.margins(resolution_penalty))
        contrastive, anchors = contrastive_terms(features, labels, c.temperature)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        per_image = torch.stack([center, margin, contrastive, bce])                   # [4, B]
        counts = torch.stack([normal.sum(), anomalous.sum(), anchors.sum(),
                              labels.new_tensor(float(len(labels)))]).clamp(min=1)
        means = (per_image * weights).sum(dim=1) / counts
        coefficients = labels.new_tensor([c.alpha, c.beta, c.gamma, c.bce_weight])
        loss = (coefficients * means).sum()
        self.update_state(features.detach(), normal, category, (coefficients[:, None] * per_image).sum(0).detach())
        return loss, torch.cat([loss.detach()[None], means.detach()])

    @torch.no_grad()
    def update_state(self, features, normal, category, image_loss):
        """Move the center, σ and the per-category loss EMAs with one batch (no gradient)."""
        c = self.config
        mean, std, count = _normal_spread(features, normal)
        self.center.copy_(torch.where(count > 0, c.center_momentum * self.center + (1 - c.center_momentum) * mean,
                                      self.center))
        self.sigma.copy_(torch.where(count > 1, c.sigma_momentum * self.sigma + (1 - c.sigma_momentum) * std,
                                     self.sigma))
        # L_cat of this batch: the mean loss of the category's images, an image's loss being
        # α·center + β·margin + γ·contrastive + bce_weight·bce of that image.
        sums = torch.zeros_like(self.difficulty).index_add_(0, category, image_loss)
        present = torch.zeros_like(self.difficulty).index_add_(0, category, torch.ones_like(image_loss))
        batch_loss = sums / present.clamp(min=1)
        m = c.difficulty_momentum
        updated = torch.where(self.difficulty_seen, m * self.difficulty + (1 - m) * batch_loss, batch_loss)
        self.difficulty.copy_(torch.where(present > 0, updated, self.difficulty))
        self.difficulty_seen |= present > 0

    def state(self) -> dict:
        """The loss state as plain tensors (for checkpoints)."""
        return {name: buffer.detach().clone() for name, buffer in self.named_buffers()}


def _normal_spread(features, normal):
    """Over the rows where ``normal`` is 1: their mean f̄, sqrt(Σ ‖f − f̄‖² / (n − 1)), and n."""
    count = normal.sum()
    mean = (features * normal[:, None]).sum(dim=0) / count.clamp(min=1)
    spread = ((features - mean).pow(2).sum(dim=1) * normal).sum()
    return mean, (spread / (count - 1).clamp(min=1)).sqrt(), count
