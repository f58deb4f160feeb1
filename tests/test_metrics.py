"""Metric functions against cases computed by hand."""

import numpy as np
import pytest

from raml.cache.files import WriteError
from raml.evaluate.metrics import average_precision, bootstrap_auroc_ci, image_auroc, paired_bootstrap_auroc_difference
from raml.evaluate.results import RESULTS_JSON, ScoredRun, config_entry, mean_std, write_results
from raml.train.thresholds import f1_max

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


def _run(scores, seed, labels=(0, 0, 1, 1, 0, 1), categories=("a", "a", "a", "a", "b", "b")):
    n = len(labels)
    return ScoredRun(
        "cfg",
        seed,
        f"run{seed}",
        np.array(categories),
        np.array([f"x{i}" for i in range(n)]),
        np.array(["good"] * n),
        np.array(labels),
        {"final": np.array(scores, float)},
    )


def test_mean_std_is_the_sample_std_over_seeds():
    # the example: two seeds at 50.0 and 72.22 are 61.11 ± 15.71 (ddof = 1), not ± 11.11
    stats = mean_std([50.0, 72.22])
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(61.11)
    assert stats["std"] == pytest.approx(22.22 / np.sqrt(2)) and round(stats["std"], 2) == 15.71
    assert mean_std([0.1, 0.2, 0.6])["std"] == pytest.approx(np.sqrt((0.04 + 0.01 + 0.09) / 2))
    assert mean_std([0.8]) == {"mean": 0.8, "std": None, "n": 1}  # one seed: no spread
    assert mean_std([0.8, None, 0.6]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1414, abs=1e-4), "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_config_entry_keeps_the_original_schema_and_averages_seeds():
    runs = [_run([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0), _run([0.1, 0.2, 0.35, 0.8, 0.2, 0.9], 1)]
    entry = config_entry(runs, {"name": "holdout"}, {"random_weights": True}, n_resamples=20)
    # category a: seed 0 → 75 %, seed 1 → 100 %; b: 100 % both
    assert entry["details"] == {"a": 87.5, "b": 100.0}
    assert entry["categories"]["a"]["auroc_std"] == pytest.approx(25 / np.sqrt(2), abs=0.005)  # 17.68, ddof = 1
    assert entry["categories"]["a"]["auroc_over_seeds"] == {"mean": 87.5, "std": 17.68, "n": 2}
    assert entry["categories"]["b"]["auroc_std"] == 0.0
    assert entry["mean_auroc"] == pytest.approx(93.75, abs=0.01)
    assert entry["std_auroc"] == pytest.approx(12.5 / np.sqrt(2), abs=0.005)  # seed means 87.5 and 100: 8.84
    assert entry["auroc_over_seeds"] == {"mean": 93.75, "std": 8.84, "n": 2} and entry["seeds"] == [0, 1]
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


def test_one_seed_has_no_standard_deviation():
    entry = config_entry([_run([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0)], {}, {}, n_resamples=10)
    assert entry["std_auroc"] is None and entry["auroc_over_seeds"] == {"mean": 87.5, "std": None, "n": 1}
    assert entry["categories"]["a"]["auroc_std"] is None and entry["categories"]["a"]["auroc_over_seeds"]["n"] == 1


def test_results_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) leaves the previous results.json whole."""
    run = _run([0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0)
    entries = {"cfg": config_entry([run], {}, {}, n_resamples=10)}
    write_results(tmp_path, entries, [run])
    before = (tmp_path / RESULTS_JSON).read_text()
    real_write_text = type(tmp_path).write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", half_then_full_disk)
    entries["cfg"]["mean_auroc"] = 12.34
    with pytest.raises(WriteError, match="results.json: cannot write: no space left on the device"):
        write_results(tmp_path, entries, [run])
    monkeypatch.undo()
    assert (tmp_path / RESULTS_JSON).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "scores.csv"]  # no temporary left


def test_bootstrap_ci_equals_roc_auc_score_on_each_resample():
    """The counts-based bootstrap gives exactly what sklearn gives on the resampled images (ties
    included), for one run and for the seed-averaged statistic of several runs."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = np.array([0] * 7 + [1] * 11)
    rng.shuffle(labels)
    scores = np.round(rng.random((3, labels.size)) + 0.3 * labels, 1)  # rounded: many ties
    draws = np.random.default_rng(5)
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    statistics = []
    for _ in range(200):
        index = np.concatenate([draws.choice(group, size=group.size, replace=True) for group in groups])
        statistics.append(np.mean([roc_auc_score(labels[index], run[index]) for run in scores]))
    expected = np.percentile(statistics, [2.5, 97.5])
    assert bootstrap_auroc_ci(labels, scores, n_resamples=200, seed=5) == pytest.approx(tuple(expected), abs=1e-12)


# --- paired bootstrap of an AUROC difference ----------------------------------------------------------


def test_resampled_aurocs_are_sklearns_auroc_of_each_resample():
    from sklearn.metrics import roc_auc_score

    from raml.evaluate.metrics import _resampled_aurocs, _stratified_resamples

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(7, int), np.ones(5, int)][rng.permutation(12)]
    scores = np.round(rng.normal(size=(2, 12)), 1)  # one decimal: plenty of ties
    index = _stratified_resamples(labels, 50, rng)
    assert (labels[index] == np.r_[np.zeros(7), np.ones(5)]).all()
    expected = [[roc_auc_score(labels[row], run[row]) for row in index] for run in scores]
    assert np.allclose(_resampled_aurocs(scores, index, 7), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("runs", [1, 3])
def test_paired_difference_of_a_configuration_with_itself_is_exactly_zero(runs):
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20), np.ones(10)]
    scores = (labels + rng.normal(size=(runs, 30))).squeeze()
    for groups in (None, np.tile(["a", "b"], 15)):  # each category: 10 normal, 5 anomalous
        assert paired_bootstrap_auroc_difference(labels, scores, scores, groups, n_resamples=200) == (0.0, 0.0, 0.0)
    # an increasing transform ranks the images alike: 0 on every resample, because both
    # configurations are scored on the same resampled images (an unpaired bootstrap would not be 0)
    assert paired_bootstrap_auroc_difference(labels, scores, 2 * scores**3 + 1, n_resamples=200) == (0.0, 0.0, 0.0)


def test_paired_difference_by_hand():
    """Images n1, n2 (normal), a1, a2 (anomalous). A = (0, 1, 2, 3) ranks every pair right (AUROC
    1); B = (0, 2, 1, 3) gets (n2, a1) wrong (AUROC ¾): difference ¼. A stratified resample
    draws two normals and two anomalous images: A stays 1, so the difference is 1 − B's AUROC.
    It is 0 whenever B ranks all drawn pairs right (normals n1 n1: ¼; else anomalies a2 a2: ¾·¼
    → 7/16 of the resamples) and 1 when B ranks all wrong (n2 n2 and a1 a1: 1/16 > 2.5 %):
    the 95 % interval is [0, 1]."""
    labels = [0, 0, 1, 1]
    assert paired_bootstrap_auroc_difference(labels, [0, 1, 2, 3], [0, 2, 1, 3]) == (0.25, 0.0, 1.0)
    assert paired_bootstrap_auroc_difference(labels, [0, 2, 1, 3], [0, 1, 2, 3]) == (-0.25, -1.0, 0.0)


def test_paired_difference_per_category_is_the_difference_of_category_means():
    # category x: the hand case above (difference ¼); category y: A and B rank alike (0) → mean ⅛
    labels = [0, 0, 1, 1, 0, 0, 1, 1]
    a, b = [0, 1, 2, 3, 0, 1, 2, 3], [0, 2, 1, 3, 5, 6, 7, 8]
    difference, low, high = paired_bootstrap_auroc_difference(labels, a, b, groups=list("xxxxyyyy"), n_resamples=300)
    assert difference == 0.125 and (low, high) == (0.0, 0.5)


def test_paired_difference_names_a_category_without_both_classes():
    with pytest.raises(ValueError, match="category y: AUROC needs both normal and anomalous"):
        paired_bootstrap_auroc_difference([0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 1], groups=list("xxyy"))
    with pytest.raises(ValueError, match="4 labels but scores of \\[4, 3\\] images"):
        paired_bootstrap_auroc_difference([0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0])


def test_category_mean_auroc_ci():
    from raml.evaluate.metrics import bootstrap_mean_auroc_ci

    rng = np.random.default_rng(3)
    labels = np.tile([0, 0, 0, 1, 1], 4)
    groups = np.repeat(["a", "b"], 10)
    scores = labels + rng.normal(size=(2, 20))
    statistic, low, high = bootstrap_mean_auroc_ci(labels, scores, groups, n_resamples=300)
    per_category = [np.mean([image_auroc(labels[groups == g], run[groups == g]) for run in scores]) for g in "ab"]
    assert statistic == pytest.approx(np.mean(per_category)) and low <= statistic <= high
    # one category: the same resamples, hence the same interval, as bootstrap_auroc_ci
    assert bootstrap_mean_auroc_ci(labels, scores, n_resamples=300, seed=4)[1:] == pytest.approx(
        bootstrap_auroc_ci(labels, scores, n_resamples=300, seed=4), abs=1e-15
    )
