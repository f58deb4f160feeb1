"""MACCL, the Margin-Aware Center-Contrastive loss (docs/method.md#maccl-the-loss), plus BCE on the visual logit.

Feature scale: the head's MACCL feature is L2-normalised, so every distance lies in [0, 2] and a
margin of 0.905 (the README's worked example) is a real distance, about 54° apart on the sphere.

State (saved in checkpoints; never trained by gradient):

- ``center``: running center c of the normal features, an EMA (``center_momentum``) of each
  batch's mean normal feature. Not re-normalised: it is a mean of unit vectors.
- ``sigma``: σ, the spread of the normal features: an EMA (``sigma_momentum``) of each batch's
  total standard deviation sqrt(Σ_i ‖f_i − f̄‖² / (n − 1)) over its n ≥ 2 normal features (the
  root of the covariance trace: the typical distance of a normal feature from its mean, on the
  same scale as the margin).
- ``difficulty``: per-category EMA (``difficulty_momentum``) of the loss (docs/method.md#auto-difficulty).

Both ``center`` and ``sigma`` are initialised from all training normals under the initial
weights (``initial_loss_state``), so the first batch already has a meaningful center.

The loss is written as pure step functions (``maccl_step``: state in, loss and new state out), so
that ``torch.func.vmap`` trains many runs at once (train/fit.py). ``loss_step(config)`` picks the
step of a config: ``maccl_step`` (this project's MACCL), ``bce_only_step`` (``--loss bce``), or the
original release's loss (``--loss-variant original``, train/original_loss.py).

Each image carries a resolution penalty max(0, 1 − r/r_max) (``resolution_penalty``); its margin
is m = m_base + λ_σ·σ + λ_res·penalty, so the adaptive margin is per image. Fixed and strong
presets set both λ to 0.

**The pixel loss** (``pixel_step``, added to any of those steps by ``with_pixel_loss`` when the
head has a pixel head) is the same margin loss per patch token, with soft labels: a token whose
cell is a fraction y defective counts (1 − y) as normal and y as defective. Center term over the
normal weight, margin term over the defective weight, with the token's margin m = m_base +
λ_σ·σ_pix + λ_res·penalty (its image's), around a center and spread of the normal tokens kept as
the image's are (``pixel_center``, ``pixel_sigma``); and instead of the contrastive term, a
class-balanced BCE on the token's logit (the mean over the defective weight and the mean over the
normal weight, averaged). Why: defective tokens are a few per cent of all tokens (MVTec AD), so a
plain mean BCE learns "normal everywhere", and a contrastive term over the ~1,000 tokens of a
batch would cost a 1,000² similarity matrix per run and step for what the margin already does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raml.train.loss_terms import adaptive_margin, center_terms, difficulty_weights, margin_terms
from raml.train.original_loss import original_category_weights, original_initial_state, original_step

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


PIXEL_TERMS = ("pixel", "pixel_center", "pixel_margin", "pixel_bce")  # per-step statistics of ``pixel_step``
PIXEL_STATE = ("pixel_center", "pixel_sigma")


def loss_hyperparameters(config) -> dict:
    """The loss's scalars of one run as 0-d float32 tensors (``vmap`` stacks them across runs).

    The EMA step sizes ``1 − momentum`` are computed here in double precision, as Python computes
    them, so a run gives the same bits whether its scalars are floats or tensors.
    """
    values = {
        name: getattr(config, name)
        for name in (
            "alpha",
            "beta",
            "gamma",
            "bce_weight",
            "temperature",
            "margin_base",
            "lambda_sigma",
            "lambda_res",
            "center_momentum",
            "sigma_momentum",
            "difficulty_momentum",
            "difficulty_scale",
            "difficulty_min",
            "difficulty_max",
            "pixel_weight",
        )
    }
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
    return {
        "center": normal_features.mean(dim=0),
        "sigma": sigma,
        "difficulty": normal_features.new_zeros(n_categories),
        "difficulty_seen": torch.zeros(n_categories, dtype=torch.bool, device=normal_features.device),
    }


def category_weights(state: dict, hp: dict) -> torch.Tensor:
    """[C] difficulty weight of each category under ``state``."""
    return difficulty_weights(
        state["difficulty"],
        state["difficulty_seen"],
        hp["difficulty_scale"],
        hp["difficulty_min"],
        hp["difficulty_max"],
    )


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
    per_image = torch.stack([center, margin, contrastive, bce])  # [4, B]
    n_images = torch.full_like(normal.sum(), len(labels))
    counts = torch.stack([normal.sum(), anomalous.sum(), anchors.sum(), n_images]).clamp(min=1)
    means = (per_image * weights).sum(dim=1) / counts
    coefficients = torch.stack([hp["alpha"], hp["beta"], hp["gamma"], hp["bce_weight"]])
    loss = (coefficients * means).sum()
    new_state = updated_state(
        state, hp, features.detach(), normal, category, (coefficients[:, None] * per_image).sum(0).detach()
    )
    margin_counts = torch.stack([(margin > 0).sum().to(loss.dtype), anomalous.sum()])
    return loss, torch.cat([loss.detach()[None], means.detach(), margin_counts]), new_state


def bce_only_step(features, logits, labels, category, resolution_penalty, state: dict, hp: dict):
    """``--loss bce`` (an ablation): the plain supervised head, ``bce_weight`` × the batch's mean BCE,
    unweighted by difficulty. The MACCL terms and state are still computed, for the log only."""
    _, stats, new_state = maccl_step(
        features.detach(), logits.detach(), labels, category, resolution_penalty, state, hp
    )
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


def initial_pixel_state(normal_token_features: torch.Tensor, normal_weights: torch.Tensor) -> dict:
    """The pixel loss's state at the start: center and σ of the training tokens' normal weight under
    the initial head (as ``initial_loss_state`` for images)."""
    center, sigma, _ = _normal_spread(normal_token_features, normal_weights)
    return {"pixel_center": center, "pixel_sigma": sigma}


def pixel_step(features, logits, targets, weights, resolution_penalty, state: dict, hp: dict):
    """One batch of the pixel loss (see the module docstring) over P tokens of each of B images.

    ``features`` [B, P, f] (unit length) and ``logits`` [B, P] from the pixel head, ``targets``
    [B, P] each token's defect fraction, ``weights`` [B, P] (0 for the tokens of an image whose mask
    is unknown), ``resolution_penalty`` [B]. Returns ``(loss, stats, new_state)`` as ``maccl_step``:
    stats are ``PIXEL_TERMS``. A pure function, for ``vmap``.
    """
    flat = features.reshape(-1, features.shape[-1])
    normal, defective = (weights * (1 - targets)).reshape(-1), (weights * targets).reshape(-1)
    margins = adaptive_margin(
        hp["margin_base"],
        hp["lambda_sigma"],
        state["pixel_sigma"],
        hp["lambda_res"],
        resolution_penalty[:, None].expand_as(targets).reshape(-1),
    )
    z = logits.reshape(-1)
    sums = torch.stack(
        [
            center_terms(flat, normal, state["pixel_center"]).sum(),
            margin_terms(flat, defective, state["pixel_center"], margins).sum(),
            (F.softplus(-z) * defective).sum(),
            (F.softplus(z) * normal).sum(),
        ]
    )  # −log σ(z), −log(1 − σ(z))
    means = sums / torch.stack([normal.sum(), defective.sum(), defective.sum(), normal.sum()]).clamp(min=1e-6)
    bce = 0.5 * (means[2] + means[3])
    loss = hp["alpha"] * means[0] + hp["beta"] * means[1] + hp["bce_weight"] * bce
    center, sigma = _moved_spread(state["pixel_center"], state["pixel_sigma"], flat.detach(), normal, hp)
    return loss, torch.stack([loss, means[0], means[1], bce]).detach(), {"pixel_center": center, "pixel_sigma": sigma}


def with_pixel_loss(image_step):
    """``image_step`` (``loss_step``) plus ``pixel_weight`` × ``pixel_step``: the image head and the pixel
    head train on the same batches, in one backward pass. The state holds both steps' keys; the
    statistics are the image step's, then ``PIXEL_TERMS``."""

    def step(
        features,
        logits,
        labels,
        category,
        resolution_penalty,
        pixel_features,
        pixel_logits,
        targets,
        weights,
        state,
        hp,
    ):
        image_state = {name: value for name, value in state.items() if name not in PIXEL_STATE}
        loss, stats, new_state = image_step(features, logits, labels, category, resolution_penalty, image_state, hp)
        pixel_loss, pixel_stats, pixel_state = pixel_step(
            pixel_features, pixel_logits, targets, weights, resolution_penalty, {k: state[k] for k in PIXEL_STATE}, hp
        )
        return loss + hp["pixel_weight"] * pixel_loss, torch.cat([stats, pixel_stats]), {**new_state, **pixel_state}

    return step


@torch.no_grad()
def _moved_spread(center, sigma, features, normal, hp) -> tuple:
    """A running center and σ of normal features moved by one batch's (EMA; unchanged without normals)."""
    mean, std, count = _normal_spread(features, normal)
    return (
        torch.where(count > 0, hp["center_momentum"] * center + hp["center_rate"] * mean, center),
        torch.where(count > 1, hp["sigma_momentum"] * sigma + hp["sigma_rate"] * std, sigma),
    )


@torch.no_grad()
def updated_state(state: dict, hp: dict, features, normal, category, image_loss) -> dict:
    """The center, σ and per-category loss EMAs moved by one batch (no gradient)."""
    center, sigma = _moved_spread(state["center"], state["sigma"], features, normal, hp)
    # L_cat of this batch: the mean loss of the category's images, an image's loss being
    # α·center + β·margin + γ·contrastive + bce_weight·bce of that image.
    sums = torch.zeros_like(state["difficulty"]).index_add_(0, category, image_loss)
    present = torch.zeros_like(state["difficulty"]).index_add_(0, category, torch.ones_like(image_loss))
    batch_loss = sums / present.clamp(min=1)
    seen = state["difficulty_seen"]
    moved = torch.where(
        seen, hp["difficulty_momentum"] * state["difficulty"] + hp["difficulty_rate"] * batch_loss, batch_loss
    )
    return {
        "center": center,
        "sigma": sigma,
        "difficulty": torch.where(present > 0, moved, state["difficulty"]),
        "difficulty_seen": seen | (present > 0),
    }


def _normal_spread(features, normal):
    """Over the rows where ``normal`` is 1: their mean f̄, sqrt(Σ ‖f − f̄‖² / (n − 1)), and n."""
    count = normal.sum()
    mean = (features * normal[:, None]).sum(dim=0) / count.clamp(min=1)
    spread = ((features - mean).pow(2).sum(dim=1) * normal).sum()
    return mean, (spread / (count - 1).clamp(min=1)).sqrt(), count
