"""``--loss-variant original``: the original release's loss (train_raml_model.py:106–181, :405–415)
against values worked out by hand from its formulas; its defaults; vmap, CLI and sweep."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raml.evaluate.sweep import run_sweep
from raml.pipeline import cli
from raml.train.config import TrainConfig, make_config
from raml.train.fit import fit, fit_runs
from raml.train.grid import parse_vary
from raml.train.infer import score_rows
from raml.train.loss import initial_loss_state, loss_hyperparameters, loss_step, maccl_step, resolution_penalty
from raml.train.original_loss import original_category_weights, original_initial_state, original_step
from raml.train.sweep import grid_configurations


def _hp(**overrides):
    """The original variant's loss scalars in float64, so that a comparison at 1e-6 tests the formulas."""
    return {
        k: v.double()
        for k, v in loss_hyperparameters(make_config("adaptive", loss_variant="original", **overrides)).items()
    }


def _state(center, sigma, difficulty, seen):
    return {
        "center": torch.tensor(center, dtype=torch.float64),
        "sigma": torch.tensor(sigma, dtype=torch.float64),
        "difficulty": torch.tensor(difficulty, dtype=torch.float64),
        "difficulty_seen": torch.tensor(seen),
    }


def _bce(logit, label):
    return math.log(1 + math.exp(logit)) - label * logit


# --- the formulas, by hand ------------------------------------------------------------------------

# Four unit vectors: normals f0, f1, f3; one anomalous image f2. Categories 0, 1, 0, 0.
FEATURES = [(1.0, 0.0), (0.0, 1.0), (0.8, 0.6), (0.6, 0.8)]
LABELS = [0.0, 0.0, 1.0, 0.0]
CATEGORY = [0, 1, 0, 0]
LOGITS = [0.0, 2.0, 0.5, -1.0]
PENALTY = 0.75  # 1 − r/r_max of every image
TAU = 0.5


ORIGINAL = dict(
    alpha=1.0,
    beta=1.0,
    gamma=0.5,
    bce_weight=1.0,
    center_momentum=0.8,
    sigma_momentum=0.9,
    margin_base=0.5,
    lambda_sigma=0.3,
    lambda_res=0.3,
    difficulty_momentum=0.7,
)


def _run_small_batch(state, **constants):
    features = torch.tensor(FEATURES, dtype=torch.float64, requires_grad=True)
    return original_step(
        features,
        torch.tensor(LOGITS, dtype=torch.float64),
        torch.tensor(LABELS, dtype=torch.float64),
        torch.tensor(CATEGORY),
        torch.full((4,), PENALTY, dtype=torch.float64),
        state,
        _hp(temperature=TAU, **constants),
    )


def _small_batch_by_hand(
    alpha,
    beta,
    gamma,
    bce_weight,
    center_momentum,
    sigma_momentum,
    margin_base,
    lambda_sigma,
    lambda_res,
    difficulty_momentum,
):
    """Every number of the original's step on the batch above, from center (0.2, 0.1), σ = 0.5, with
    these loss constants (``ORIGINAL``: the original's)."""
    # center terms ‖f − c‖² against the old center (0.2, 0.1): (0.8, −0.1), (−0.2, 0.9), (0.4, 0.7)
    center = [0.64 + 0.01, 0.04 + 0.81, 0.0, 0.16 + 0.49]
    # the center moves (the original: 0.8·(0.2, 0.1) + 0.2·the mean of the normals, (1.6/3, 1.8/3))
    new_center = (
        center_momentum * 0.2 + (1 - center_momentum) * 1.6 / 3,
        center_momentum * 0.1 + (1 - center_momentum) * 1.8 / 3,
    )
    # σ: std of the 6 numbers 1, 0, 0, 1, 0.6, 0.8 (mean 3.4/6, n − 1 = 5); the original: 0.9·0.5 + 0.1·std
    values = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8]
    mean = sum(values) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    new_sigma = sigma_momentum * 0.5 + (1 - sigma_momentum) * std
    # margin of f2 with the new σ and the new center
    m = margin_base + lambda_sigma * new_sigma + lambda_res * PENALTY
    distance = math.hypot(0.8 - new_center[0], 0.6 - new_center[1])
    margin = [0.0, 0.0, max(0.0, m - distance), 0.0]
    # contrastive, τ = 0.5; cosines f0·f1 = 0, f0·f2 = 0.8, f0·f3 = 0.6, f1·f2 = 0.6, f1·f3 = 0.8, f2·f3 = 0.96
    e = lambda cosine: math.exp(cosine / TAU)  # noqa: E731
    contrastive = [
        -math.log((e(0) + e(0.6)) / (e(0) + e(0.6) + e(0.8) + 1e-8)),  # anchor 0: positives 1, 3
        -math.log((e(0) + e(0.8)) / (e(0) + e(0.8) + e(0.6) + 1e-8)),  # anchor 1: positives 0, 3
        0.0,  # anchor 2: no positive
        -math.log((e(0.6) + e(0.8)) / (e(0.6) + e(0.8) + e(0.96) + 1e-8)),
    ]  # anchor 3: positives 0, 1
    image_loss = [alpha * c + beta * mg + gamma * con for c, mg, con in zip(center, margin, contrastive)]
    bce = sum(_bce(z, y) for z, y in zip(LOGITS, LABELS)) / 4
    # the tracker, image by image (categories 0, 1, 0, 0) from EMAs 1.0 and 3.0
    l0, l1, l2, l3 = image_loss
    move = lambda running, value: difficulty_momentum * running + (1 - difficulty_momentum) * value  # noqa: E731
    difficulty = [move(move(move(1.0, l0), l2), l3), move(3.0, l1)]
    return dict(
        center=center,
        new_center=new_center,
        new_sigma=new_sigma,
        margin=margin,
        m=m,
        contrastive=contrastive,
        image_loss=image_loss,
        bce=bce,
        bce_weight=bce_weight,
        difficulty=difficulty,
    )


@pytest.mark.parametrize(
    "constants",
    [
        ORIGINAL,
        dict(
            alpha=2.0,
            beta=3.0,
            gamma=0.25,
            bce_weight=0.5,
            center_momentum=0.5,
            sigma_momentum=0.6,
            margin_base=0.7,
            lambda_sigma=0.2,
            lambda_res=0.1,
            difficulty_momentum=0.4,
        ),
    ],
    ids=["original", "every-scalar-from-hp"],
)
def test_original_step_by_hand_with_two_categories_seen(constants):
    """Tracker before the batch: category 0 at 1.0, category 1 at 3.0 → L_global 2, w = 0.75, 1.25.
    The second case changes every scalar the step reads: none of them is a hidden constant."""
    state = _state((0.2, 0.1), 0.5, [1.0, 3.0], [True, True])
    loss, stats, new = _run_small_batch(state, **constants)
    h = _small_batch_by_hand(**constants)
    assert h["margin"][2] > 0.1  # the hinge is active
    weights = [0.75, 1.25, 0.75, 0.75]
    expected_loss = sum(w * loss for w, loss in zip(weights, h["image_loss"])) / 4 + h["bce_weight"] * h["bce"]
    expected_stats = [
        expected_loss,
        sum(h["center"]) / 3,
        h["margin"][2],
        sum(h["contrastive"]) / 3,
        h["bce"],
        1.0,
        1.0,
    ]
    assert float(loss.detach()) == pytest.approx(expected_loss, abs=1e-6)
    assert stats.tolist() == pytest.approx(expected_stats, abs=1e-6)
    assert new["center"].tolist() == pytest.approx(list(h["new_center"]), abs=1e-6)
    assert float(new["sigma"]) == pytest.approx(h["new_sigma"], abs=1e-6)
    # the tracker takes the images one at a time in batch order: category 0 three times, 1 once
    assert new["difficulty"].tolist() == pytest.approx(h["difficulty"], abs=1e-6)
    assert new["difficulty_seen"].tolist() == [True, True]
    # the input state is not modified
    assert state["center"].tolist() == [0.2, 0.1] and float(state["sigma"]) == 0.5


def test_original_step_by_hand_from_an_empty_tracker():
    """No category seen: every weight is 1; a category's first image loss sets its EMA."""
    loss, _, new = _run_small_batch(_state((0.2, 0.1), 0.5, [0.0, 0.0, 0.0], [False, False, False]))
    h = _small_batch_by_hand(**ORIGINAL)
    assert float(loss.detach()) == pytest.approx(sum(h["image_loss"]) / 4 + h["bce"], abs=1e-6)
    l0, l1, l2, l3 = h["image_loss"]
    assert new["difficulty"].tolist() == pytest.approx([0.7 * (0.7 * l0 + 0.3 * l2) + 0.3 * l3, l1, 0.0], abs=1e-6)
    assert new["difficulty_seen"].tolist() == [True, True, False]


def test_the_issues_batch_shape_against_the_original_formulas():
    """16 unit-norm features, 6 anomalous, r_max 900 for all, σ = 0.6: every term and the new state
    recomputed here with plain numpy, one formula of the original at a time."""
    rng = np.random.default_rng(14)
    f = rng.normal(size=(16, 32))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.array([1.0] * 6 + [0.0] * 10)
    rng.shuffle(labels)
    category = rng.integers(0, 3, 16)
    logits = rng.normal(size=16)
    c = rng.normal(size=32) * 0.1
    difficulty = [0.8, 1.6, 1.2]
    penalty = float(resolution_penalty(224, 900))
    assert 0.5 + 0.3 * 0.6 + 0.3 * penalty == pytest.approx(0.905, abs=5e-4)  # the README's worked example
    normal, anomalous = labels == 0, labels == 1

    center = ((f - c) ** 2).sum(axis=1) * normal
    new_c = 0.8 * c + 0.2 * f[normal].mean(axis=0)
    new_sigma = 0.9 * 0.6 + 0.1 * f[normal].std(ddof=1)  # every element of the normal features
    m = 0.5 + 0.3 * new_sigma + 0.3 * penalty
    margin = np.maximum(0.0, m - np.linalg.norm(f - new_c, axis=1)) * anomalous
    s = f @ f.T / 0.07
    contrastive = np.zeros(16)
    for i in range(16):
        positive = [j for j in range(16) if j != i and labels[j] == labels[i]]
        negative = [j for j in range(16) if labels[j] != labels[i]]
        p, n = np.exp(s[i, positive]).sum(), np.exp(s[i, negative]).sum()
        contrastive[i] = -np.log(p / (p + n + 1e-8))
    image_loss = center + margin + 0.5 * contrastive
    g = np.mean(difficulty)
    weights = np.clip([1 + 0.5 * (difficulty[k] - g) / g for k in category], 0.5, 2.0)
    bce = np.mean([_bce(z, y) for z, y in zip(logits, labels)])
    running = list(difficulty)
    for k, value in zip(category, image_loss):
        running[k] = 0.7 * running[k] + 0.3 * value

    loss, stats, new = original_step(
        torch.tensor(f),
        torch.tensor(logits),
        torch.tensor(labels),
        torch.tensor(category),
        torch.full((16,), penalty, dtype=torch.float64),
        _state(c.tolist(), 0.6, difficulty, [True] * 3),
        _hp(),
    )
    expected = [
        np.mean(weights * image_loss) + bce,
        center.sum() / 10,
        margin.sum() / 6,
        contrastive.mean(),
        bce,
        (margin > 0).sum(),
        6,
    ]
    assert float(loss.detach()) == pytest.approx(expected[0], abs=1e-6)
    assert stats.tolist() == pytest.approx(expected, abs=1e-6)
    assert new["center"].numpy() == pytest.approx(new_c, abs=1e-6)
    assert float(new["sigma"]) == pytest.approx(new_sigma, abs=1e-6)
    assert new["difficulty"].tolist() == pytest.approx(running, abs=1e-6)
    # in float32, as training runs it, the same numbers to float32 rounding
    state32 = {
        k: v.float() if v.is_floating_point() else v for k, v in _state(c.tolist(), 0.6, difficulty, [True] * 3).items()
    }
    _, stats32, _ = original_step(
        torch.tensor(f, dtype=torch.float32),
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.float32),
        torch.tensor(category),
        torch.full((16,), penalty),
        state32,
        loss_hyperparameters(make_config("adaptive", loss_variant="original")),
    )
    assert stats32.tolist() == pytest.approx(expected, abs=1e-5)


def test_a_batch_of_one_class_has_no_contrastive_term():
    """All normal: the original's contrastive term is 0 for every image (:155), loss and gradient
    equal those with γ = 0."""
    generator = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64, generator=generator))
    args = (
        torch.zeros(6, dtype=torch.float64),
        torch.zeros(6, dtype=torch.float64),
        torch.zeros(6, dtype=torch.long),
        torch.full((6,), 0.75, dtype=torch.float64),
        _state([0.1] * 4, 0.6, [0.0], [False]),
    )
    gradients, losses = [], []
    for hp in (_hp(), _hp(gamma=0.0)):
        leaf = features.clone().requires_grad_()
        loss, stats, _ = original_step(leaf, *args, hp)
        loss.backward()
        gradients.append(leaf.grad)
        losses.append(float(loss.detach()))
        assert float(stats[3]) == 0.0
    assert losses[0] == losses[1] and torch.equal(gradients[0], gradients[1])


def test_small_temperature_stays_finite():
    """τ = 0.01 puts e^{100} in the sums (beyond float32); log-sum-exp keeps loss and gradient finite
    and equal to the float64 formula."""
    generator = torch.Generator().manual_seed(2)
    features = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator), dim=1)
    labels = torch.tensor([0.0, 1.0] * 4)
    args = (torch.zeros(8), labels, torch.zeros(8, dtype=torch.long), torch.full((8,), 0.75))
    state = original_initial_state(4, 1, "cpu")
    leaf = features.clone().requires_grad_()
    hp = loss_hyperparameters(make_config("adaptive", loss_variant="original", temperature=0.01))
    loss, stats, _ = original_step(leaf, *args, state, hp)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    reference = original_step(
        features.double(),
        *(a.double() if a.is_floating_point() else a for a in args),
        {k: v.double() if v.is_floating_point() else v for k, v in state.items()},
        {k: v.double() for k, v in hp.items()},
    )[1]
    # all but the contrastive mean, whose count of terms > 0 (the original's rule) depends on rounding
    kept = [0, 1, 2, 4, 5, 6]
    assert stats[kept].tolist() == pytest.approx(reference[kept].tolist(), rel=1e-5)


def test_tracker_weight_rules():
    hp = _hp()
    weights = lambda difficulty, seen: original_category_weights(  # noqa: E731
        _state([0.0], 1.0, difficulty, seen), hp
    ).tolist()
    assert weights([1.0, 3.0, 9.0], [True, True, False]) == pytest.approx([0.75, 1.25, 1.0])  # unseen: 1
    assert weights([5.0, 0.0], [True, False]) == [1.0, 1.0]  # one seen: all 1
    assert weights([1e-7, 3e-7], [True, True]) == [1.0, 1.0]  # L_global < 1e-6
    assert weights([0.0, 10.0, 0.0], [True, True, True]) == pytest.approx([0.5, 2.0, 0.5])  # clipped


def test_initial_state_is_the_originals():
    config = make_config("adaptive", loss_variant="original")
    state = initial_loss_state(config, torch.ones(5, 3), n_categories=2)
    assert state["center"].tolist() == [0.0, 0.0, 0.0] and float(state["sigma"]) == 1.0
    assert state["difficulty_seen"].tolist() == [False, False]
    assert loss_step(config) is original_step and loss_step(make_config("adaptive")) is maccl_step


# --- defaults ------------------------------------------------------------------------------------


def test_the_variant_resolves_the_center_momentum_explicit_values_kept():
    assert make_config("adaptive").center_momentum == 0.9
    assert make_config("adaptive", loss_variant="original").center_momentum == 0.8
    assert make_config("adaptive", loss_variant="original", center_momentum=0.9).center_momentum == 0.9
    assert make_config("adaptive", center_momentum=0.8).center_momentum == 0.8
    # r_max is not resolved by the variant (README: given as --r-max 900)
    assert make_config("adaptive", loss_variant="original").r_max == "image"
    # a stored config keeps its value whatever the variant
    stored = make_config("adaptive", loss_variant="original").to_dict()
    assert TrainConfig.from_dict(stored).center_momentum == 0.8
    assert parse_vary(["center_momentum=0.8,0.9"]) == {"center_momentum": [0.8, 0.9]}


# --- training: vmap, CLI, sweep --------------------------------------------------------------------

TINY = dict(epochs=2, lr=1e-3, hidden_dim=32, attn_dim=8, feature_dim=16, loss_variant="original", r_max="900")


@pytest.fixture(scope="module")
def table(two_category_table):
    return two_category_table


def test_two_original_runs_trained_together_score_like_each_alone(table):
    configs = [make_config("adaptive", seed=0, **TINY), make_config("fixed", seed=1, gamma=0.2, **TINY)]
    together = fit_runs(table, configs)
    heldout = together[0].split.heldout
    for config, batched in zip(configs, together):
        single = fit(table, config)
        scores = [
            score_rows(head.model, table, heldout, config.visual_weight, config.text_weight)["final"]
            for head in (batched, single)
        ]
        assert np.abs(scores[0] - scores[1]).max() < 1e-4
        for name in ("center", "sigma", "difficulty"):
            assert torch.allclose(batched.loss_state[name], single.loss_state[name], atol=1e-5)
    first, second = (score_rows(head.model, table, heldout)["final"] for head in together)
    assert np.abs(first - second).max() > 1e-3  # the two runs really differ


def test_train_cli_with_the_original_loss(tmp_path, table):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--cache-dir",
            str(table.cache_dir),
            "--out",
            str(out),
            "--loss-variant",
            "original",
            "--r-max",
            "900",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--hidden-dim",
            "32",
            "--feature-dim",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["loss_variant"], config["r_max"], config["center_momentum"]) == ("original", "900", 0.8)
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(math.isfinite(record["loss"]) for record in history)
    explicit = CliRunner().invoke(
        cli,
        [
            "train",
            "--cache-dir",
            str(table.cache_dir),
            "--out",
            str(tmp_path / "b"),
            "--loss-variant",
            "original",
            "--center-momentum",
            "0.9",
            "--epochs",
            "1",
            "--hidden-dim",
            "32",
            "--feature-dim",
            "16",
        ],
    )
    assert explicit.exit_code == 0, explicit.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["center_momentum"] == 0.9


def test_a_sweep_over_both_variants_reports_both_rows(tmp_path, table):
    from raml.evaluate.report import write_report

    common = {k: v for k, v in TINY.items() if k != "loss_variant"}
    summary = run_sweep(
        table,
        grid_configurations(["adaptive"], {"loss_variant": ["raml", "original"]}, **common),
        [0],
        tmp_path / "sweep",
        n_resamples=10,
    )
    names = ["adaptive-loss_variantraml", "adaptive-loss_variantoriginal"]
    assert list(summary["configurations"]) == names
    assert len(summary["passes"]) == 2  # the variants change the loss's code: two passes
    assert summary["configurations"][names[1]]["config"]["center_momentum"] == 0.8
    assert summary["configurations"][names[0]]["config"]["center_momentum"] == 0.9
    report = write_report([tmp_path / "sweep" / "results"], tmp_path / "report").read_text()
    for name in names:
        assert f"| {name}" in report
