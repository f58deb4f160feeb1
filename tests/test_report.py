"""report: side-by-side tables, plots, and refusal to mix image lists."""

import json

import numpy as np
import pytest

from raml.evaluate.report import MixedImageListsError, group_by_image_list, load_rows, write_report
from raml.evaluate.results import ScoredRun, config_entry, write_results
from raml.train.split import image_list_hash


def _results(out_dir, config, relpaths, protocol="holdout", random_weights=True, seed=0):
    """A results directory for ``config`` scored on ``relpaths`` (half normal, half anomalous)."""
    n = len(relpaths)
    labels = np.arange(n) % 2
    rng = np.random.default_rng(seed)
    run = ScoredRun(
        config,
        seed,
        f"runs/{config}",
        np.array(["bottle"] * n),
        np.array(relpaths),
        np.where(labels == 1, "broken", "good"),
        labels,
        {"final": labels * 0.3 + rng.uniform(0, 1, n)},
    )
    image_list = {
        "name": protocol,
        "image_list_hash": image_list_hash(relpaths),
        "n_images": n,
        "dataset": {"kind": "mvtec", "root": str(out_dir / "nowhere")},
        "source": "test",
    }
    entry = config_entry(
        [run],
        image_list,
        {"backbone": "tiny", "weights": "random(seed=0)", "random_weights": random_weights},
        n_resamples=20,
    )
    return write_results(out_dir, {config: entry}, [run])


def test_report_refuses_rows_scored_on_different_image_lists(tmp_path):
    a = _results(tmp_path / "raml", "RAML", [f"bottle/test/{i}.png" for i in range(10)])
    b = _results(tmp_path / "winclip", "WinCLIP", [f"bottle/test/{i}.png" for i in range(1, 11)])
    with pytest.raises(MixedImageListsError) as err:
        write_report([tmp_path], tmp_path / "report")
    message = str(err.value)
    assert "different image lists" in message and str(a) in message and str(b) in message
    assert not (tmp_path / "report" / "report.md").exists()


def test_rows_on_the_same_images_share_a_table_and_other_protocols_get_their_own(tmp_path):
    images = [f"bottle/test/{i}.png" for i in range(10)]
    _results(tmp_path / "raml", "RAML", images)
    _results(tmp_path / "winclip", "WinCLIP", list(reversed(images)), seed=1)  # same set, other order
    _results(tmp_path / "transfer", "RAML-on-visa", [f"candle/{i}.JPG" for i in range(8)], protocol="transfer")
    groups = group_by_image_list(load_rows([tmp_path]))
    assert sorted(groups) == ["holdout · mvtec", "transfer · mvtec"]
    assert [row.config for row in groups["holdout · mvtec"]] == ["RAML", "WinCLIP"]


def test_report_writes_markdown_and_plots_marked_not_meaningful(tmp_path):
    images = [f"bottle/test/{i}.png" for i in range(12)]
    _results(tmp_path / "results" / "raml", "RAML", images)
    _results(tmp_path / "results" / "winclip", "WinCLIP", images, seed=3)
    path = write_report([tmp_path / "results"], tmp_path / "report")
    text = path.read_text()
    assert "| category | RAML † | WinCLIP † |" in text
    assert "| bottle |" in text and "| **mean** |" in text
    assert "NOT MEANINGFUL" in text
    assert "Anomaly maps: no results file of this table saved anomaly maps" in text
    for suffix in ("auroc", "roc", "histograms"):
        png = tmp_path / "report" / f"holdout_mvtec_{suffix}.png"
        assert png.stat().st_size > 5000 and f"({png.name})" in text


def test_original_release_results_files_are_readable(tmp_path):
    legacy = tmp_path / "orig" / "results.json"
    legacy.parent.mkdir()
    legacy.write_text(
        json.dumps({"RAML_Proposed": {"mean_auroc": 94.09, "details": {"bottle": 100.0, "cable": 85.09}}})
    )
    text = write_report([legacy], tmp_path / "report").read_text()
    assert "original-release results" in text
    assert "| cable | 85.09 |" in text and "**94.09**" in text


def test_a_file_that_is_not_a_results_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a results file"):
        write_report([bad], tmp_path / "report")


def _seeded_results(out_dir, config, relpaths, seeds, extra=None):
    """Like ``_results``, with several seeds (``ScoredRun`` per seed) and extra entry fields."""
    n = len(relpaths)
    labels = np.arange(n) % 2
    runs = [
        ScoredRun(
            config,
            seed,
            f"runs/{config}-seed{seed}",
            np.array(["bottle"] * n),
            np.array(relpaths),
            np.where(labels == 1, "broken", "good"),
            labels,
            {"final": labels * 0.3 + np.random.default_rng(seed).uniform(0, 1, n)},
        )
        for seed in seeds
    ]
    image_list = {
        "name": "holdout",
        "image_list_hash": image_list_hash(relpaths),
        "n_images": n,
        "dataset": {"kind": "mvtec", "root": str(out_dir / "nowhere")},
        "source": "test",
    }
    entry = config_entry(
        runs,
        image_list,
        {"backbone": "tiny", "weights": "random(seed=0)", "random_weights": True},
        n_resamples=20,
        extra=extra,
    )
    return write_results(out_dir, {config: entry}, runs), entry


def test_every_table_shows_n_and_the_sample_std(tmp_path):
    images = [f"bottle/test/{i}.png" for i in range(12)]
    _, three = _seeded_results(
        tmp_path / "raml",
        "RAML",
        images,
        [0, 1, 2],
        extra={"score_weights": {"visual_weight": 0.85, "text_weight": 0.15}},
    )
    _seeded_results(tmp_path / "winclip", "WinCLIP", images, [None], extra={"image_score": "global"})
    text = write_report([tmp_path], tmp_path / "report").read_text()
    assert "| n (seeds) | 3 | 1 |" in text
    stats = three["categories"]["bottle"]
    assert stats["auroc_std"] == pytest.approx(np.std(stats["auroc_per_seed"], ddof=1), abs=0.01)  # sample std
    assert f"{stats['auroc']:.2f} ± {stats['auroc_std']:.2f} [" in text
    assert "| RAML | ? | 0.85·s_visual + 0.15·s_text | 3 |" in text
    assert "| WinCLIP | ? | global | 1 |" in text


def test_older_results_files_are_shown_with_the_sample_std(tmp_path):
    """Entries written before auroc_over_seeds existed stored a population std: the report recomputes it."""
    path, entry = _seeded_results(tmp_path / "raml", "RAML", [f"bottle/test/{i}.png" for i in range(12)], [0, 1])
    data = json.loads(path.read_text())
    del data["RAML"]["auroc_over_seeds"]
    for stats in data["RAML"]["categories"].values():
        del stats["auroc_over_seeds"]
    data["RAML"]["categories"]["bottle"]["auroc_std"] = float(np.std(entry["categories"]["bottle"]["auroc_per_seed"]))
    path.write_text(json.dumps(data))
    text = write_report([path], tmp_path / "report").read_text()
    a, b = entry["categories"]["bottle"]["auroc_per_seed"]
    assert f"± {abs(a - b) / np.sqrt(2):.2f}" in text and "| n (seeds) | 2 |" in text


def test_report_shows_the_fraction_of_anomalous_images_inside_the_margin(tmp_path):
    images = [f"bottle/test/{i}.png" for i in range(12)]
    _seeded_results(
        tmp_path / "a",
        "adaptive",
        images,
        [0, 1],
        extra={"anomalous_inside_margin": 1.0, "anomalous_inside_margin_over_seeds": {"mean": 1.0, "std": 0.0, "n": 2}},
    )
    _seeded_results(tmp_path / "b", "old-run", images, [0])
    text = write_report([tmp_path], tmp_path / "report").read_text()
    assert "| 1.00 ± 0.00 | tiny |" in text  # adaptive
    assert "| old-run | ? | ? | 1 |" in text and "| n/a | tiny |" in text  # not recorded: n/a
    assert "hinge gradient that does not depend on m" in text
