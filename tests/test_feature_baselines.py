"""Baselines on the cached features: linear, knn-tiles, zero-shot-text."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from raml.cache import read_cache
from raml.cache.synthetic import write_synthetic_cache
from raml.errors import UserError
from raml.evaluate.baselines.features import (
    baseline_split,
    knn_crop_distances,
    knn_tiles_scores,
    linear_scores,
    run_feature_baseline,
    zero_shot_text_scores,
)
from raml.evaluate.metrics import image_auroc
from raml.evaluate.report import comparison_markdown, group_by_image_list, load_rows
from raml.evaluate.run import evaluate_checkpoints
from raml.pipeline import cli
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from raml.train.infer import text_score
from raml.train.split import holdout_split

SEPARABLE = {"bottle": (60, 20, 20, 900), "metal_nut": (60, 20, 20, 700)}
# D = 128, not 32: at D = 32 a crop's noise (norm ~1 at any D) blurs nearest-neighbour distances so much
# that kNN reached only 0.81 held-out AUROC on metal_nut; CLIP's features have 512.
QUICK = dict(epochs=2, lr=1e-3, hidden_dim=32, attn_dim=8, feature_dim=16)


@pytest.fixture(scope="module")
def separable_table(tmp_path_factory):
    return read_cache(
        write_synthetic_cache(tmp_path_factory.mktemp("sep") / "cache", SEPARABLE, dim=128, separation=3.0)
    )


@pytest.fixture(scope="module")
def split(separable_table):
    return baseline_split(separable_table)


def _heldout_auroc(table, test_rows, scores) -> dict:
    return {
        category: image_auroc(table.label[test_rows][here], scores[here])
        for category in table.categories
        for here in [table.category[test_rows] == category]
    }


def test_default_split_is_the_one_train_makes(separable_table, split):
    train_rows, test_rows, image_list = split
    reference = holdout_split(separable_table, seed=0, fraction=0.2)
    assert sorted(test_rows.tolist()) == reference.heldout.tolist()
    assert sorted(train_rows.tolist()) == reference.train.tolist()
    assert list(separable_table.relpath[test_rows]) == sorted(reference.heldout_relpaths)  # scored in relpath order
    assert image_list.hash == reference.manifest()["heldout_hash"] and image_list.protocol == "holdout"


@pytest.mark.parametrize("per_category", [False, True])
def test_linear_separates_a_separable_cache(separable_table, split, per_category):
    train_rows, test_rows, _ = split
    scores = linear_scores(separable_table, train_rows, test_rows, per_category)["scores"]["final"]
    assert min(_heldout_auroc(separable_table, test_rows, scores).values()) >= 0.9


def test_linear_per_category_scores_a_category_with_its_own_model(separable_table, split):
    """Per category, changing the other category's training images changes nothing."""
    train_rows, test_rows, _ = split
    bottle_only = train_rows[separable_table.category[train_rows] == "bottle"]
    bottle = separable_table.category[test_rows] == "bottle"
    full = linear_scores(separable_table, train_rows, test_rows, per_category=True)["scores"]["final"]
    alone = linear_scores(separable_table, bottle_only, test_rows[bottle], per_category=True)["scores"]["final"]
    assert np.array_equal(full[bottle], alone)


def test_knn_tiles_separates_a_separable_cache_from_normals_only(separable_table, split):
    train_rows, test_rows, _ = split
    result = knn_tiles_scores(separable_table, train_rows, test_rows)
    assert min(_heldout_auroc(separable_table, test_rows, result["scores"]["final"]).values()) >= 0.9
    normals = train_rows[separable_table.label[train_rows] == 0]
    again = knn_tiles_scores(separable_table, normals, test_rows)  # no anomalous image: same scores
    assert np.array_equal(result["scores"]["final"], again["scores"]["final"])
    bank = result["extra"]["memory_bank"]
    assert bank["normal_images"] == len(normals) == 2 * (60 + 16)  # train/good + 80 % of test/good
    assert bank["crops"] == 21 * len(normals) and bank["crops_per_category"] == {
        "bottle": 21 * 76,
        "metal_nut": 21 * 76,
    }


def test_knn_distance_is_to_the_nearest_normal_crop_of_the_same_scale():
    """Two normal images in 2-d; a test crop equal to a normal crop of another scale is not near."""
    east, north, west = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
    normal = np.array([[east] * 21, [north] * 21])
    normal[1, 5:] = west  # image 2's 4x4 tiles point west
    test = np.array([[north] * 21])
    test[0, 20] = east  # a tile pointing east: only crops 0-4 do
    test[0, 0] = [np.sqrt(0.5), np.sqrt(0.5)]  # the global crop: 45° from both normals
    distances = knn_crop_distances(normal, test)[0]
    assert distances[0] == pytest.approx(np.sqrt(2 - np.sqrt(2)))  # sqrt(2 − 2·cos 45°)
    assert distances[1:5].tolist() == [0.0] * 4  # north is a normal quadrant
    assert distances[5:20] == pytest.approx(np.sqrt(2.0))  # north vs tiles east, west: 90°
    assert distances[20] == pytest.approx(0.0)


def test_zero_shot_text_is_ramls_text_score(separable_table, split):
    _, test_rows, _ = split
    scores = zero_shot_text_scores(separable_table, test_rows)["scores"]["final"]
    expected = text_score(
        separable_table.features[test_rows, 0], separable_table.text, separable_table.category[test_rows]
    )
    assert np.array_equal(scores, expected)


def test_zero_shot_text_separates_a_cache_whose_prompts_describe_the_classes(separable_table, split):
    """The synthetic cache's prompt embeddings are random; give each category "prompts" that point
    at its classes (the mean global crop of its official-train normals, and of its training
    anomalies), as a real CLIP's prompts roughly do."""
    train_rows, test_rows, _ = split
    table = separable_table
    text = {}
    for category in table.categories:
        rows = train_rows[table.category[train_rows] == category]
        text[category] = {
            kind: table.features[rows[table.label[rows] == label], 0].astype(np.float32).mean(0, keepdims=True)
            for kind, label in (("normal", 0), ("anomalous", 1))
        }
    scores = zero_shot_text_scores(dataclasses.replace(table, text=text), test_rows)["scores"]["final"]
    assert min(_heldout_auroc(table, test_rows, scores).values()) >= 0.9


def test_wrong_options_are_refused(separable_table, tmp_path):
    with pytest.raises(UserError, match="--split-from takes the split of that run"):
        baseline_split(separable_table, split_from=tmp_path, split_seed=1)
    with pytest.raises(UserError, match="--per-category applies to the linear baseline only"):
        run_feature_baseline("knn-tiles", separable_table, tmp_path, per_category=True)
    with pytest.raises(UserError, match="unknown baseline 'patchcore'"):
        run_feature_baseline("patchcore", separable_table, tmp_path)
    train_rows, test_rows, _ = baseline_split(separable_table)
    normal_rows = train_rows[separable_table.label[train_rows] == 0]
    with pytest.raises(UserError, match="of all categories are all normal; a classifier needs both classes"):
        linear_scores(separable_table, normal_rows, test_rows)
    with pytest.raises(UserError, match="of bottle are all normal; .* \\(drop --per-category\\)"):
        linear_scores(separable_table, normal_rows, test_rows, per_category=True)
    with pytest.raises(UserError, match="category bottle has no normal training image"):
        knn_tiles_scores(separable_table, train_rows[separable_table.label[train_rows] == 1], test_rows)


def test_baselines_share_ramls_table_with_split_from(tmp_path, separable_table):
    """Fitted on a training run's training images, scored on its held-out images: same image-list
    hash as the run's own evaluation, one table in the report."""
    run = tmp_path / "adaptive-seed0"
    write_run(run, fit(separable_table, make_config("adaptive", split_seed=3, **QUICK)))
    raml_path, raml = evaluate_checkpoints(
        [run], separable_table.cache_dir, tmp_path / "raml", n_resamples=20, log=lambda *_: None
    )
    paths = [raml_path]
    for name, per_category in (("linear", False), ("linear", True), ("knn-tiles", False), ("zero-shot-text", False)):
        path, entries, _ = run_feature_baseline(
            name,
            separable_table,
            tmp_path / f"{name}-{per_category}",
            split_from=run,
            per_category=per_category,
            n_resamples=20,
        )
        ((config, entry),) = entries.items()
        assert entry["protocol"]["image_list_hash"] == raml["adaptive"]["protocol"]["image_list_hash"]
        assert entry["protocol"]["source"] == str(run / "split.json") and entry["seeds"] == [None]
        assert json.loads(path.read_text())[config]["method"] == entry["method"]
        paths.append(path)
    ((title, rows),) = group_by_image_list(load_rows(paths)).items()  # one table: the same images
    assert title == "holdout · synthetic"
    assert (
        "| category | adaptive † | linear † | linear-per-category † | knn-tiles † | zero-shot-text † |"
        in comparison_markdown(title, rows, [])
    )


@pytest.mark.parametrize(
    "name, options, tokens",
    [
        ("linear", ["--per-category"], False),
        ("knn-tiles", [], False),
        ("zero-shot-text", [], False),
        ("zero-shot-text", [], True),
        ("knn-patches", [], True),
    ],
)
def test_baseline_commands_on_an_extracted_cache(tmp_path, mvtec_cache, mvtec_token_cache, name, options, tokens):
    out = tmp_path / name
    cache = mvtec_token_cache if tokens else mvtec_cache
    result = CliRunner().invoke(
        cli, ["baseline", name, "--cache-dir", str(cache), "--out", str(out), "--bootstrap", "20", *options]
    )
    assert result.exit_code == 0, result.output
    assert "holdout protocol" in result.output and "NOT MEANINGFUL" in result.output
    assert (out / "results.json").is_file() and (out / "scores.csv").is_file()
    assert (out / "anomaly_maps.npz").is_file() == tokens  # maps are drawn from patch tokens
    assert ("anomaly_maps.npz" in result.output) == tokens
    entry = json.loads((out / "results.json").read_text())[name + ("-per-category" if options else "")]
    if name == "zero-shot-text" and not tokens:
        assert "--patch-tokens" in entry["pixel"]["not_available"]["bottle"]  # says how to add them
    if tokens:
        assert set(entry["pixel"]["categories"]) == {"bottle", "metal_nut"} and "pixel: AUROC" in result.output
    if name == "knn-patches":
        # 2 categories x (4 train/good + 1 of the 2 test/good) normal training images x 64 tokens
        assert "memory banks: 640 tokens kept of 640" in result.output
    if name == "knn-tiles":
        assert "memory bank: 210 crops of 10 normal images" in result.output and "per 1,000 images" in result.output
