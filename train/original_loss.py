"""The original release's loss, formula for formula (``--loss-variant original``).

Source: ``train_raml_model.py`` of the public repository voveed/RAML_INDUSTRIAL_ANOMALY_DETECTION
(read at commit 6ee7c979), lines 106–181 (``AutoDifficultyTracker``, ``MACCLLoss``) and 405–415
(the training step). References below are ``:line`` of that file. This is our own code: it
computes the same numbers, written as a pure step function so that ``torch.func.vmap`` trains
many runs at once (train/fit.py), with the contract of ``train.loss.maccl_step``.

What the original does in one batch, in its order (the README's deviations table says how
``raml`` differs and why):

1. Center term ``‖f_i − c‖²`` of each normal image against the center from before the batch
   (:137–138); then the center moves: ``c ← 0.8·c + 0.2·mean(normal f)`` (:140, our
   ``center_momentum``, which ``--loss-variant original`` resolves to 0.8).
2. σ moves: ``σ ← 0.9·σ + 0.1·std(normal f)`` (:145), the standard deviation of all the
   elements of the normal features (one number over n·D values, n·D − 1 in the denominator).
3. Margin term ``relu(m − ‖f_i − c‖)`` of each anomalous image with the **new** σ in
   ``m = m_base + λ_σ·σ + λ_res·(1 − r/r_max)`` and the **new** center (:146–151).
4. Contrastive term of each anchor, the "sum inside the log" form on L2-normalised features
   (:156–164): ``−log(Σ_pos e^{s} / (Σ_pos e^{s} + Σ_neg e^{s} + 1e-8))``, s = cosine/τ; 0 for
   an anchor without positives and for every anchor of a batch with one class only (:155).
5. ``loss = mean over all B images of w_i·(α·center_i + β·margin_i + γ·contrastive_i)``
   (:173–178), plus the mean BCE of the visual logit, not weighted by difficulty (:411–413).
6. ``w_i`` is the weight of image i's category under the tracker **before** the batch (:175):
   1 while fewer than two categories have been seen, for a category not seen yet, or when the
   global loss (the mean of the seen categories' EMAs) is below 1e-6; otherwise
   ``clip(1 + 0.5·(L_cat − L_global)/L_global, 0.5, 2.0)`` (:114–118). Then the tracker takes
   each image's loss without BCE, ``α·center_i + β·margin_i + γ·contrastive_i``, one image at a
   time in batch order (:176–177): a category's first loss sets its EMA, later ones move it
   with momentum 0.7 (:111–113).

The initial state is the original's (:125–126): center 0, σ = 1, no category seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raml.train.loss_terms import adaptive_margin, center_terms, difficulty_weights, margin_terms

# Constants of the original that are not hyper-parameters there either.
TINY_GLOBAL_LOSS = 1e-6  # :118, below it every category weighs 1
CONTRASTIVE_EPSILON = 1e-8  # :164, added to the contrastive denominator
MIN_CATEGORIES_SEEN = 2  # :115, fewer seen categories: every weight is 1


def original_initial_state(feature_dim: int, n_categories: int, device) -> dict:
    """The original's starting state (:125–126): center 0, σ = 1, no category loss seen."""
    return {
        "center": torch.zeros(feature_dim, device=device),
        "sigma": torch.tensor(1.0, device=device),
        "difficulty": torch.zeros(n_categories, device=device),
        "difficulty_seen": torch.zeros(n_categories, dtype=torch.bool, device=device),
    }


def original_step(features, logits, labels, category, resolution_penalty, state: dict, hp: dict):
    """One batch of the original release's loss (see the module docstring for the formulas).

    Same contract as ``train.loss.maccl_step``: ``labels`` float [B] (1 anomalous), ``category``
    long [B], ``resolution_penalty`` [B], ``hp`` from ``loss_hyperparameters`` (α, β, γ, τ,
    ``bce_weight`` — 1 in the original —, the margin values and every momentum are read from it).

    Returns ``(loss, stats, new_state)``. ``stats`` is a detached [7] tensor ordered as
    ``STEP_STATS``, with the numbers the original computes per batch:

    - ``loss``: the total minimised (the difficulty-weighted MACCL mean over all images plus
      ``bce_weight`` × the BCE mean);
    - ``center``: the mean center term over the normal images, against the pre-batch center (the
      original's ``l_center``, :141);
    - ``margin``: the mean margin term over the anomalous images, with the updated σ and center
      (``l_margin``, :152);
    - ``contrastive``: the mean contrastive term over the anchors whose term is > 0 (``l_con``,
      :165);
    - ``bce``: the mean BCE;
    - ``inside_margin``, ``anomalous``: the anomalous images closer to the (new) center than their
      margin, and all anomalous images.

    The three term means are unweighted and are not what the total adds up (the total averages
    the weighted per-image sums over all B images); 0 stands for a term without images.
    """
    anomalous, normal = labels, 1 - labels
    detached = features.detach()
    n_normal, n_anomalous = normal.sum(), anomalous.sum()

    center = center_terms(features, normal, state["center"])  # :137–138
    normal_mean = (detached * normal[:, None]).sum(dim=0) / n_normal.clamp(min=1)
    new_center = torch.where(
        n_normal > 0, hp["center_momentum"] * state["center"] + hp["center_rate"] * normal_mean, state["center"]
    )  # :140
    new_sigma = torch.where(
        n_normal > 0,
        hp["sigma_momentum"] * state["sigma"] + hp["sigma_rate"] * _elementwise_std(detached, normal),
        state["sigma"],
    )  # :145
    margins = adaptive_margin(hp["margin_base"], hp["lambda_sigma"], new_sigma, hp["lambda_res"], resolution_penalty)
    margin = margin_terms(features, anomalous, new_center, margins)  # :146–151
    contrastive = sum_inside_log_contrastive(features, labels, hp["temperature"])  # :154–165

    image_loss = hp["alpha"] * center + hp["beta"] * margin + hp["gamma"] * contrastive  # :173
    weights = original_category_weights(state, hp)[category]  # :175
    bce = F.binary_cross_entropy_with_logits(logits, labels)  # :411
    loss = (image_loss * weights).mean() + hp["bce_weight"] * bce  # :178, :413
    difficulty, seen = _tracked_difficulty(state, hp, category, image_loss.detach())  # :176–177

    scored_anchors = (contrastive > 0).sum()
    stats = torch.stack(
        [
            loss,
            center.sum() / n_normal.clamp(min=1),
            margin.sum() / n_anomalous.clamp(min=1),
            contrastive.sum() / scored_anchors.clamp(min=1).to(loss.dtype),
            bce,
            (margin > 0).sum().to(loss.dtype),
            n_anomalous.to(loss.dtype),
        ]
    ).detach()
    new_state = {"center": new_center, "sigma": new_sigma, "difficulty": difficulty, "difficulty_seen": seen}
    return loss, stats, new_state


def sum_inside_log_contrastive(features, labels, temperature):
    """Per anchor i: ``−log(Σ_p e^{s_ip} / (Σ_{a≠i} e^{s_ia} + 1e-8))``, s = cosine similarity / τ of
    the L2-normalised features, p the other images of i's class (:156–164).

    0 for an anchor without positives, and for every anchor when the batch holds one class only
    (:155). Computed with log-sum-exp (no overflow at small τ); the 1e-8 is kept, as
    ``logaddexp(log Σ, log 1e-8)``.
    """
    unit = F.normalize(features, dim=1)
    logits = unit @ unit.T / temperature
    self_mask = torch.eye(len(features), dtype=torch.bool, device=features.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    has_positive = positives.any(dim=1)
    both_classes = (labels.sum() > 0) & ((1 - labels).sum() > 0)
    # A row without positives takes its whole row here: finite, and discarded by the where below
    # (an all −inf row would give an infinite term and a NaN gradient through the where).
    log_positive = torch.logsumexp(logits.masked_fill(~(positives | ~has_positive[:, None]), float("-inf")), dim=1)
    log_others = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
    log_denominator = torch.logaddexp(log_others, torch.full_like(log_others, math.log(CONTRASTIVE_EPSILON)))
    return torch.where(has_positive & both_classes, log_denominator - log_positive, torch.zeros_like(log_others))


def original_category_weights(state: dict, hp: dict) -> torch.Tensor:
    """[C] the original tracker's weight of each category (:114–118): ``train.loss.difficulty_weights``,
    except that every weight is 1 while fewer than two categories have been seen or while the
    global loss is below 1e-6."""
    loss, seen = state["difficulty"], state["difficulty_seen"]
    n_seen = seen.sum()
    global_loss = (loss * seen).sum() / n_seen.clamp(min=1)
    weights = difficulty_weights(loss, seen, hp["difficulty_scale"], hp["difficulty_min"], hp["difficulty_max"])
    active = (n_seen >= MIN_CATEGORIES_SEEN) & (global_loss >= TINY_GLOBAL_LOSS)
    return torch.where(active, weights, torch.ones_like(weights))


def _tracked_difficulty(state: dict, hp: dict, category, image_loss):
    """The tracker after taking each image's loss in batch order (:111–113, :176–177)."""
    difficulty, seen = state["difficulty"], state["difficulty_seen"]
    categories = torch.arange(len(difficulty), device=difficulty.device)
    for position in range(len(image_loss)):  # the batch size is static: a fixed loop, vmap-safe
        this = categories == category[position]
        value = image_loss[position]
        moved = hp["difficulty_momentum"] * difficulty + hp["difficulty_rate"] * value
        difficulty = torch.where(this, torch.where(seen, moved, value), difficulty)
        seen = seen | this
    return difficulty, seen


def _elementwise_std(features, rows):
    """Sample standard deviation of all the elements of the rows where ``rows`` is 1 (torch's
    ``features[rows].std()``, :145): one number over n·D values, n·D − 1 in the denominator."""
    count = rows.sum() * features.shape[1]
    mean = (features * rows[:, None]).sum() / count.clamp(min=1)
    squares = ((features - mean).pow(2) * rows[:, None]).sum()
    return (squares / (count - 1).clamp(min=1)).sqrt()
