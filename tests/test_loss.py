"""MACCL loss, margins and difficulty weights against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from raml.train.config import make_config
from raml.train.loss import (
    category_weights,
    contrastive_terms,
    image_r_max,
    initial_loss_state,
    loss_hyperparameters,
    maccl_step,
    resolution_penalty,
    state_margins,
    updated_state,
)
from raml.train.loss_terms import adaptive_margin, center_terms, difficulty_weights, margin_terms


def _state(sigma=0.0, center=(0.0, 0.0), categories=1):
    return {
        "center": torch.tensor(center),
        "sigma": torch.tensor(sigma),
        "difficulty": torch.zeros(categories),
        "difficulty_seen": torch.zeros(categories, dtype=torch.bool),
    }


def test_readme_worked_example_gives_0_905():
    penalty = resolution_penalty(224, 900)
    assert float(penalty) == pytest.approx(0.751, abs=5e-4)
    assert adaptive_margin(0.5, 0.3, 0.6, 0.3, float(penalty)) == pytest.approx(0.905, abs=5e-4)
    hp = loss_hyperparameters(make_config("adaptive"))
    assert float(state_margins(_state(sigma=0.6), hp, torch.tensor(float(penalty)))) == pytest.approx(0.905, abs=5e-4)


@pytest.mark.parametrize("preset, expected", [("fixed", 0.5), ("strong", 1.0)])
def test_fixed_and_strong_margins_ignore_sigma_and_resolution(preset, expected):
    hp = loss_hyperparameters(make_config(preset))
    for sigma in (0.0, 0.6, 1.3):
        margins = state_margins(_state(sigma=sigma), hp, torch.tensor([0.0, 0.3, 0.751, 0.95]))
        assert torch.allclose(margins, torch.full((4,), expected))


def test_margin_options_override_the_preset():
    config = make_config("fixed", margin_base=0.7)
    assert (config.margin_base, config.lambda_sigma, config.lambda_res) == (0.7, 0.0, 0.0)
    config = make_config("adaptive", lambda_sigma=0.0)
    assert (config.margin_base, config.lambda_sigma, config.lambda_res) == (0.5, 0.0, 0.3)


def test_resolution_penalty_is_zero_for_images_no_larger_than_the_input():
    assert resolution_penalty(224, [224, 100, 448]).tolist() == [0.0, 0.0, 0.5]


def test_r_max_modes():
    height, width, category = np.array([700, 900, 1024]), np.array([800, 900, 512]), np.array(["a", "a", "b"])
    assert image_r_max(height, width, category, "image").tolist() == [800, 900, 1024]
    assert image_r_max(height, width, category, "category").tolist() == [850, 850, 1024]
    assert image_r_max(height, width, category, "900").tolist() == [900, 900, 900]


# A 4-image batch on the unit circle: normals (1,0), (0,1); anomalous (-1,0), (0,-1); center at 0.
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
LABELS = torch.tensor([0.0, 0.0, 1.0, 1.0])


def test_center_term_by_hand():
    center = torch.tensor([0.5, 0.0])
    # normals: ‖(0.5, 0)‖² = 0.25 and ‖(-0.5, 1)‖² = 1.25; anomalous images contribute 0
    assert center_terms(FEATURES, 1 - LABELS, center).tolist() == [0.25, 1.25, 0.0, 0.0]


def test_margin_term_by_hand():
    center = torch.tensor([0.5, 0.0])
    margins = torch.tensor([2.0, 2.0, 2.0, 1.0])
    # anomalous: ‖(-1.5, 0)‖ = 1.5 → relu(2 − 1.5) = 0.5; ‖(-0.5, -1)‖ = √1.25 → relu(1 − 1.118) = 0
    terms = margin_terms(FEATURES, LABELS, center, margins)
    assert terms.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0])


def test_contrastive_term_by_hand():
    tau = 0.5
    terms, anchors = contrastive_terms(FEATURES, LABELS, tau)
    # Each anchor's positive is orthogonal (logit 0); of its other two images one is orthogonal
    # (logit 0), one opposite (logit −1/τ): term = −(0 − log(e⁰ + e⁰ + e^{−1/τ})).
    expected = math.log(2 + math.exp(-1 / tau))
    assert terms.tolist() == pytest.approx([expected] * 4)
    assert anchors.tolist() == [1.0] * 4


def test_contrastive_term_matches_the_definition_on_an_uneven_batch():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 3))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 1])
    tau = 0.07
    terms, _ = contrastive_terms(torch.tensor(f), torch.tensor(labels, dtype=torch.float64), tau)
    for i in range(5):
        others = [a for a in range(5) if a != i]
        log_norm = math.log(sum(math.exp(f[i] @ f[a] / tau) for a in others))
        positives = [p for p in others if labels[p] == labels[i]]
        expected = -sum(f[i] @ f[p] / tau - log_norm for p in positives) / len(positives)
        assert float(terms[i]) == pytest.approx(expected, rel=1e-9)


def test_total_loss_by_hand():
    hp = loss_hyperparameters(make_config("fixed", margin_base=1.5, temperature=0.5))
    # center 0, σ 0, no category seen → weights 1
    loss, stats, _ = maccl_step(
        FEATURES, torch.zeros(4), LABELS, torch.zeros(4, dtype=torch.long), torch.zeros(4), _state(), hp
    )
    terms = stats[:5]
    center, margin = 1.0, 0.5  # ‖f‖² = 1; relu(1.5 − 1) = 0.5
    contrastive = math.log(2 + math.exp(-1 / 0.5))
    bce = math.log(2)  # logit 0
    expected = 1.0 * center + 1.0 * margin + 0.5 * contrastive + 1.0 * bce
    assert terms.tolist() == pytest.approx([expected, center, margin, contrastive, bce])
    assert float(loss) == pytest.approx(expected)
    assert stats[5:].tolist() == [2.0, 2.0]  # both anomalous images lie inside the margin of 1.5


def test_difficulty_weight_formula_and_clip():
    seen = torch.ones(3, dtype=torch.bool)
    # L_global = 2: w = 1 + 0.5·(L − 2)/2
    assert difficulty_weights(torch.tensor([1.0, 2.0, 3.0]), seen).tolist() == pytest.approx([0.75, 1.0, 1.25])
    # L_global = 2.5: raw weights 0.5 and 2.5 → clipped to [0.5, 2]
    weights = difficulty_weights(torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.ones(4, dtype=torch.bool))
    assert weights.tolist() == pytest.approx([0.5, 0.5, 0.5, 2.0])
    # unseen categories weigh 1 and do not count in L_global
    weights = difficulty_weights(torch.tensor([1.0, 3.0, 99.0]), torch.tensor([True, True, False]))
    assert weights.tolist() == pytest.approx([0.75, 1.25, 1.0])


def test_difficulty_ema_momentum_0_7():
    hp = loss_hyperparameters(make_config("adaptive"))
    state, normal = _state(categories=2), torch.ones(4)
    state = updated_state(state, hp, FEATURES, normal, torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0, 4.0, 4.0]))
    assert state["difficulty"].tolist() == pytest.approx([2.0, 4.0])  # first sight: the batch mean
    state = updated_state(state, hp, FEATURES, normal, torch.tensor([0, 0, 0, 0]), torch.tensor([4.0, 4.0, 4.0, 4.0]))
    assert state["difficulty"].tolist() == pytest.approx([0.7 * 2 + 0.3 * 4, 4.0])  # category 1 absent


def test_each_category_is_weighted_by_its_difficulty():
    """Category 0 (EMA loss 1) and 1 (EMA loss 3): L_global = 2, so w = 0.75 and 1.25; every term
    of an image is multiplied by its category's weight."""
    hp = loss_hyperparameters(make_config("fixed", margin_base=1.5, temperature=0.5))
    state = _state(categories=2)
    state["difficulty"], state["difficulty_seen"] = torch.tensor([1.0, 3.0]), torch.tensor([True, True])
    assert category_weights(state, hp).tolist() == pytest.approx([0.75, 1.25])
    category = torch.tensor([0, 1, 0, 1])  # one normal and one anomalous image per category
    _, stats, _ = maccl_step(FEATURES, torch.zeros(4), LABELS, category, torch.zeros(4), state, hp)
    weights = torch.tensor([0.75, 1.25, 0.75, 1.25])
    contrastive = math.log(2 + math.exp(-1 / 0.5))
    # center: (0.75·1 + 1.25·1) / 2 normals; margin: (0.75 + 1.25)·0.5 / 2; bce: Σ w·log 2 / 4
    assert stats[1:5].tolist() == pytest.approx([1.0, 0.5, float(weights.mean()) * contrastive, math.log(2)])
    uneven = torch.tensor([0, 0, 1, 1])  # both normals in category 0, both anomalous in 1
    _, stats, _ = maccl_step(FEATURES, torch.zeros(4), LABELS, uneven, torch.zeros(4), state, hp)
    assert stats[1:3].tolist() == pytest.approx([0.75, 1.25 * 0.5])


def test_center_and_sigma_follow_their_definitions():
    config = make_config("adaptive", center_momentum=0.9, sigma_momentum=0.9)
    state = initial_loss_state(config, FEATURES[:2], n_categories=1)
    assert state["center"].tolist() == pytest.approx([0.5, 0.5])
    # total std of (1,0), (0,1): sqrt((0.5 + 0.5) / (2 − 1)) = 1
    assert float(state["sigma"]) == pytest.approx(1.0)
    # a batch with one normal moves the center but not σ (σ needs two normals)
    state = updated_state(
        state,
        loss_hyperparameters(config),
        FEATURES,
        torch.tensor([0.0, 0.0, 1.0, 0.0]),
        torch.zeros(4, dtype=torch.long),
        torch.ones(4),
    )
    assert state["center"].tolist() == pytest.approx([0.9 * 0.5 - 0.1, 0.9 * 0.5])
    assert float(state["sigma"]) == pytest.approx(1.0)
