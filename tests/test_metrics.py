"""Metric functions against cases computed by hand."""
import numpy as np
import pytest

from evaluate.metrics import (average_precision, bootstrap_auroc_ci, f1_max, image_auroc,
                              weighted_pixel_auroc)
from evaluate.results import ScoredRun, config_entry

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_auroc_by_hand():
    # anomalous-normal pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) → 3/4
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_auroc_counts_ties_as_half():
    # pairs: (0.5 vs 0.5) = ½, (0.5 vs 0.2) = 1, (0.9 vs 0.5) = 1, (0.9 vs 0.2) = 1 → 3.5/4
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)


def test_average_precision_by_hand():
    # ranked: 0.8 (anomalous: P=1, R=½), 0.4 (normal), 0.35 (anomalous: P=⅔, R=1) → ½·1 + ½·⅔
    assert average_precision(LABELS, SCORES) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_f1_max_and_its_threshold_by_hand():
    # threshold 0.35: flags 0.35, 0.4, 0.8 → P=⅔, R=1, F1=0.8 (0.1: 0.667, 0.4: 0.5, 0.8: 0.667)
    f1, threshold = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_f1_max_with_tied_scores():
    # 0.5 is shared by a normal and an anomalous image: the threshold can only take both or neither.
    # at 0.5: P=2/3, R=1 → 0.8; at 0.9: P=1, R=½ → ⅔
    f1, threshold = f1_max([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
    assert (f1, threshold) == (pytest.approx(0.8), pytest.approx(0.5))


@pytest.mark.parametrize("metric", [image_auroc, average_precision, f1_max, bootstrap_auroc_ci])
def test_one_class_only_is_a_clear_error(metric):
    with pytest.raises(ValueError, match="both normal and anomalous.*only normal"):
        metric([0, 0, 0], [0.1, 0.2, 0.3])


def test_bootstrap_ci_brackets_the_auroc_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(30)]
    scores = labels * 0.8 + rng.normal(0, 0.6, 60)
    low, high = bootstrap_auroc_ci(labels, scores, n_resamples=300, seed=1)
    assert low < image_auroc(labels, scores) < high
    assert 0.5 < low and high <= 1.0
    assert bootstrap_auroc_ci(labels, scores, n_resamples=300, seed=1) == (low, high)
    assert bootstrap_auroc_ci(labels, scores, n_resamples=300, seed=2) != (low, high)


def test_bootstrap_ci_of_a_perfect_separation_is_a_point():
    assert bootstrap_auroc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_resamples=50) == (1.0, 1.0)


def test_weighted_pixel_auroc_equals_the_auroc_of_the_expanded_pixels():
    tile_scores = np.array([0.9, 0.2, 0.6])
    defective = np.array([3, 0, 1])
    clean = np.array([1, 4, 3])
    pixels_scores = np.repeat(np.r_[tile_scores, tile_scores], np.r_[defective, clean])
    pixel_labels = np.repeat([1, 1, 1, 0, 0, 0], np.r_[defective, clean])
    assert weighted_pixel_auroc(tile_scores, defective, clean) == pytest.approx(image_auroc(pixel_labels, pixels_scores))


def _run(scores, seed, labels=(0, 0, 1, 1, 0, 1), categories=("a", "a", "a", "a", "b", "b")):
    n = len(labels)
    return ScoredRun("cfg", seed, f"run{seed}", np.array(categories), np.array([f"x{i}" for i in range(n)]),
                     np.array(["good"] * n), np.array(labels), {"final": np.array(scores, float)})


def test_config_entry_keeps_the_original_schema_and_averages_seeds():
    runs = [_run([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0), _run([0.1, 0.2, 0.35, 0.8, 0.2, 0.9], 1)]
    entry = config_entry(runs, {"name": "holdout"}, {"random_weights": True}, n_resamples=20)
    # category a: seed 0 → 75 %, seed 1 → 100 %; b: 100 % both
    assert entry["details"] == {"a": 87.5, "b": 100.0}
    assert entry["categories"]["a"]["auroc_std"] == 12.5
    assert entry["mean_auroc"] == pytest.approx(93.75, abs=0.01)
    assert entry["std_auroc"] == pytest.approx(6.25)          # seed means 87.5 and 100
    assert entry["seeds"] == [0, 1]
    assert entry["meaningful"] is False and "NOT MEANINGFUL" in entry["warning"]


def test_config_entry_marks_a_one_class_category_not_available():
    run = _run([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0, labels=(0, 0, 1, 1, 0, 0))
    entry = config_entry([run], {}, {}, n_resamples=10)
    assert entry["details"] == {"a": 75.0}
    assert "only normal" in entry["not_available"]["b"]


def test_config_entry_refuses_seeds_scored_on_other_images():
    other = _run([0.1] * 6, 1)
    other.relpath = np.array([f"y{i}" for i in range(6)])
    with pytest.raises(ValueError, match="other images"):
        config_entry([_run([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0), other], {}, {}, n_resamples=10)


def test_bootstrap_ci_equals_roc_auc_score_on_each_resample():
    """The counts-based bootstrap gives exactly what sklearn gives on the resampled images (ties
    included), for one run and for the seed-averaged statistic of several runs."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    labels = np.array([0] * 7 + [1] * 11)
    rng.shuffle(labels)
    scores = np.round(rng.random((3, labels.size)) + 0.3 * labels, 1)     # rounded: many ties
    draws = np.random.default_rng(5)
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    statistics = []
    for _ in range(200):
        index = np.concatenate([draws.choice(group, size=group.size, replace=True) for group in groups])
        statistics.append(np.mean([roc_auc_score(labels[index], run[index]) for run in scores]))
    expected = np.percentile(statistics, [2.5, 97.5])
    assert bootstrap_auroc_ci(labels, scores, n_resamples=200, seed=5) == pytest.approx(tuple(expected), abs=1e-12)
