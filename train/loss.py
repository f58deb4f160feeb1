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
weights (``initial_loss_state``), so the first batch already has a meaningful center.

The loss is written as pure step functions (``maccl_step``: state in, loss and new state out), so
that ``torch.func.vmap`` trains many runs at once (train/fit.py). ``loss_step(config)`` picks the
step of a config: ``maccl_step`` (this project's MACCL), ``bce_only_step`` (``--loss bce``), or the
original release's loss (``--loss-variant original``, train/original_loss.py).

Each image carries a resolution penalty max(0, 1 − r/r_max) (``resolution_penalty``); its margin
is m = m_base + λ_σ·σ + λ_res·penalty, so the adaptive margin is per image. Fixed and strong
presets set both λ to 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from train.loss_terms import adaptive_margin, center_terms, difficulty_weights, margin_terms
from train.original_loss import original_category_weights, original_initial_state, original_step

TERMS = ("loss", "center", "margin", "contrastive", "bce")


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


# Per-step statistics a loss step returns: TERMS, then two counts for "Watch the margin": the
# batch's anomalous images whose distance to the center is below their margin, and all its
# anomalous images. While the hinge is active its gradient does not depend on m, so two margin
# settings train alike until this fraction differs.
STEP_STATS = (*TERMS, "inside_margin", "anomalous")


def loss_hyperparameters(config) -> dict:
    """The loss's scalars of one run as 0-d float32 tensors (``vmap`` stacks them across runs).

    The EMA step sizes ``1 − momentum`` are computed here in double precision, as Python computes
    them, so a run gives the same bits whether its scalars are floats or tensors.
    """
    values = {name: getattr(config, name) for name in (
        "alpha", "beta", "gamma", "bce_weight", "temperature", "margin_base", "lambda_sigma", "lambda_res",
        "center_momentum", "sigma_momentum", "difficulty_momentum", "difficulty_scale", "difficulty_min",
        "difficulty_max")}
    for name in ("center_momentum", "sigma_momentum", "difficulty_momentum"):
        values[name.replace("momentum", "rate")] = 1.0 - values[name]
    return {name: torch.tensor(float(value)) for name, value in values.items()}


def initial_loss_state(config, normal_features: torch.Tensor, n_categories: int) -> dict:
    """The loss state a run starts from: for ``raml``, center and σ of the normal features of the
    whole training set under the initial head (so the first batch already has a meaningful
    center), no category loss seen yet; for ``original``, the original release's start."""
    if config.loss_variant == "original":
        return original_initial_state(normal_features.shape[1], n_categories, normal_features.device)
    _, sigma, _ = _normal_spread(normal_features, torch.ones_like(normal_features[:, 0]))
    return {"center": normal_features.mean(dim=0), "sigma": sigma,
            "difficulty": normal_features.new_zeros(n_categories),
            "difficulty_seen": torch.zeros(n_categories, dtype=torch.bool, device=normal_features.device)}


def category_weights(state: dict, hp: dict) -> torch.Tensor:
    """[C] difficulty weight of each category under ``state``."""
    return difficulty_weights(state["difficulty"], state["difficulty_seen"], hp["difficulty_scale"],
                              hp["difficulty_min"], hp["difficulty_max"])


def state_margins(state: dict, hp: dict, resolution_penalty) -> torch.Tensor:
    """Each image's margin under the state's σ."""
    return adaptive_margin(hp["margin_base"], hp["lambda_sigma"], state["sigma"], hp["lambda_res"], resolution_penalty)


def maccl_step(features, logits, labels, category, resolution_penalty, state: dict, hp: dict):
    """One batch of ``α·L_center + β·L_margin + γ·L_contrastive + bce_weight·L_bce``.

    Each term is a mean over the images it concerns (normal / anomalous / anchors with a positive /
    all), every image weighted by its category's difficulty weight; the loss uses the state from
    before the batch. ``labels`` float [B] (1 anomalous), ``category`` long [B],
    ``resolution_penalty`` [B]; ``hp`` from ``loss_hyperparameters``.

    Returns ``(loss, stats, new_state)``: the scalar to minimise, a detached [7] tensor of
    ``STEP_STATS`` (total, the four term means, and the two margin counts), and the state moved by
    this batch. A pure function (no in-place update of its inputs), so ``torch.func.vmap`` runs many
    runs' steps as one.
    """
    anomalous, normal = labels, 1 - labels
    weights = category_weights(state, hp)[category]
    center = center_terms(features, normal, state["center"])
    margin = margin_terms(features, anomalous, state["center"], state_margins(state, hp, resolution_penalty))
    contrastive, anchors = contrastive_terms(features, labels, hp["temperature"])
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    per_image = torch.stack([center, margin, contrastive, bce])                   # [4, B]
    n_images = torch.full_like(normal.sum(), len(labels))
    counts = torch.stack([normal.sum(), anomalous.sum(), anchors.sum(), n_images]).clamp(min=1)
    means = (per_image * weights).sum(dim=1) / counts
    coefficients = torch.stack([hp["alpha"], hp["beta"], hp["gamma"], hp["bce_weight"]])
    loss = (coefficients * means).sum()
    new_state = updated_state(state, hp, features.detach(), normal, category,
                              (coefficients[:, None] * per_image).sum(0).detach())
    margin_counts = torch.stack([(margin > 0).sum().to(loss.dtype), anomalous.sum()])
    return loss, torch.cat([loss.detach()[None], means.detach(), margin_counts]), new_state


def bce_only_step(features, logits, labels, category, resolution_penalty, state: dict, hp: dict):
    """``--loss bce`` (an ablation): the plain supervised head, ``bce_weight`` × the batch's mean BCE,
    unweighted by difficulty. The MACCL terms and state are still computed, for the log only."""
    _, stats, new_state = maccl_step(features.detach(), logits.detach(), labels, category, resolution_penalty,
                                     state, hp)
    loss = hp["bce_weight"] * F.binary_cross_entropy_with_logits(logits, labels)
    return loss, torch.cat([loss.detach()[None], stats[1:]]), new_state


def weights_of(config):
    """The function ``(state, hp) → [C]`` difficulty weights of ``config``'s loss variant."""
    if config.loss_variant == "original":
        return original_category_weights
    return category_weights


def loss_step(config):
    """The step function of ``config``'s loss (``loss_variant`` × ``loss``); see ``maccl_step``."""
    if config.loss == "bce":
        return bce_only_step
    if config.loss_variant == "original":
        return original_step
    return maccl_step


@torch.no_grad()
def updated_state(state: dict, hp: dict, features, normal, category, image_loss) -> dict:
    """The center, σ and per-category loss EMAs moved by one batch (no gradient)."""
    mean, std, count = _normal_spread(features, normal)
    center = torch.where(count > 0, hp["center_momentum"] * state["center"] + hp["center_rate"] * mean,
                         state["center"])
    sigma = torch.where(count > 1, hp["sigma_momentum"] * state["sigma"] + hp["sigma_rate"] * std, state["sigma"])
    # L_cat of this batch: the mean loss of the category's images, an image's loss being
    # α·center + β·margin + γ·contrastive + bce_weight·bce of that image.
    sums = torch.zeros_like(state["difficulty"]).index_add_(0, category, image_loss)
    present = torch.zeros_like(state["difficulty"]).index_add_(0, category, torch.ones_like(image_loss))
    batch_loss = sums / present.clamp(min=1)
    seen = state["difficulty_seen"]
    moved = torch.where(seen, hp["difficulty_momentum"] * state["difficulty"] + hp["difficulty_rate"] * batch_loss,
                        batch_loss)
    return {"center": center, "sigma": sigma,
            "difficulty": torch.where(present > 0, moved, state["difficulty"]), "difficulty_seen": seen | (present > 0)}


def _normal_spread(features, normal):
    """Over the rows where ``normal`` is 1: their mean f̄, sqrt(Σ ‖f − f̄‖² / (n − 1)), and n."""
    count = normal.sum()
    mean = (features * normal[:, None]).sum(dim=0) / count.clamp(min=1)
    spread = ((features - mean).pow(2).sum(dim=1) * normal).sum()
    return mean, (spread / (count - 1).clamp(min=1)).sqrt(), count
