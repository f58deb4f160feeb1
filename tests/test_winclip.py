"""WinCLIP: window masks, harmonic aggregation, window embeddings, and the baseline end to end."""

import json

import numpy as np
import pytest
import torch

from raml.evaluate.baselines.winclip import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    WinClip,
    compositional_prompts,
    harmonic_aggregation,
    window_embeddings,
    window_masks,
)
from raml.evaluate.baselines.winclip_run import run_winclip


def test_window_masks_2x2_on_a_3x3_grid():
    assert window_masks((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]


def test_window_masks_3x3_on_the_tiny_models_4x4_grid():
    masks = window_masks((4, 4), 3)
    assert masks.shape == (4, 9)
    assert masks[0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert masks[3].tolist() == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert window_masks((4, 4), 2).shape == (9, 4)


def test_window_larger_than_the_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        window_masks((2, 2), 3)


def test_harmonic_aggregation_by_hand():
    scores = torch.tensor([[1.0, 0.5, 0.25, 0.2]])  # the four 2x2 windows of a 3x3 grid
    patch = harmonic_aggregation(scores, window_masks((3, 3), 2), (3, 3))[0]
    expected = [
        [1.0, 2 / (1 + 2), 0.5],  # corners: one window; edges: two
        [2 / (1 + 4), 4 / (1 + 2 + 4 + 5), 2 / (2 + 5)],  # centre: all four windows
        [0.25, 2 / (4 + 5), 0.2],
    ]
    assert np.allclose(patch.numpy(), expected)


def test_harmonic_aggregation_is_below_the_arithmetic_mean_and_batched():
    scores = torch.tensor([[0.9, 0.1, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5]])
    patch = harmonic_aggregation(scores, window_masks((3, 3), 2), (3, 3))
    assert patch[0, 1, 1] < scores[0].mean()  # a low window pulls the patch down more than a mean would
    assert torch.allclose(patch[1], torch.full((3, 3), 0.5))


def test_prompt_ensemble_is_states_times_templates():
    prompts = compositional_prompts("metal_nut")
    assert len(prompts["normal"]) == len(NORMAL_STATES) * len(TEMPLATES)
    assert len(prompts["anomalous"]) == len(ANOMALOUS_STATES) * len(TEMPLATES)
    assert "a photo of a flawless metal nut for visual inspection." in prompts["normal"]
    assert len(set(TEMPLATES)) == len(TEMPLATES)


def test_full_grid_window_equals_the_global_embedding(tiny_backbone):
    pixels = torch.randn(2, 3, 32, 32)
    global_embedding, (whole,) = window_embeddings(tiny_backbone, pixels, [window_masks((4, 4), 4)])
    assert torch.allclose(whole[:, 0], global_embedding, atol=1e-5)
    expected = tiny_backbone.model.encode_image(pixels)
    assert torch.allclose(global_embedding, expected, atol=1e-5)


def test_a_window_sees_only_its_own_patches(tiny_backbone):
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[..., 24:, 24:] += 3.0  # the bottom-right patch (3, 3) of the 4x4 grid only
    masks = [window_masks((4, 4), 2)]
    _, (before,) = window_embeddings(tiny_backbone, pixels, masks)
    _, (after,) = window_embeddings(tiny_backbone, changed, masks)
    assert torch.allclose(before[0, 0], after[0, 0], atol=1e-6)  # top-left window: untouched
    assert not torch.allclose(before[0, -1], after[0, -1], atol=1e-3)  # bottom-right window: sees it


def test_scores_are_probabilities_with_a_patch_map(tiny_backbone):
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    result = WinClip(tiny_backbone).score(pixels, "bottle")
    assert result["map"].shape == (3, 4, 4)
    for name in ("final", "global", "map_max"):
        assert result[name].shape == (3,) and ((result[name] > 0) & (result[name] < 1)).all()
    assert np.array_equal(result["final"], result["global"])  # the paper's zero-shot image score
    assert not np.allclose(result["global"], result["map_max"])
    variant = WinClip(tiny_backbone, image_score="global+map").score(pixels, "bottle")
    assert np.allclose(variant["final"], (result["global"] + result["map_max"]) / 2)  # WinCLIP+'s rule
    with pytest.raises(ValueError, match="global, global\\+map"):
        WinClip(tiny_backbone, image_score="max")


def test_winclip_official_protocol_end_to_end(tmp_path, mvtec_root, tiny_backbone):
    path, entries = run_winclip(
        "mvtec",
        mvtec_root,
        tmp_path / "winclip",
        lambda: tiny_backbone,
        protocol="official",
        workers=0,
        n_resamples=20,
        progress=False,
    )
    entry = json.loads(path.read_text())["WinCLIP zero-shot"]
    assert entry["image_score"] == "global" and "paper" in entry["image_score_rule"]
    assert entry["protocol"]["name"] == "official"
    assert entry["protocol"]["n_images"] == 12  # 2 categories x (2 good + 2x2 defective) test images
    assert set(entry["details"]) == {"bottle", "metal_nut"}
    assert entry["random_weights"] is True and entry["meaningful"] is False
    assert set(entry["pixel"]["categories"]) == {"bottle", "metal_nut"} and not entry["pixel"]["not_available"]
    assert entry["pixel"]["categories"]["bottle"]["anomalous"] == 4 and entry["pixel"]["mean"]["aupro"]["n"] == 1
    maps = np.load(tmp_path / "winclip" / "anomaly_maps.npz")
    assert maps["WinCLIP zero-shot:grid"].shape == (12, 4, 4)  # the tiny model's patch grid over the whole image
    assert entry["anomaly_maps"]["tiles"] == 1
    rows = (tmp_path / "winclip" / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("config,seed,category,relpath,defect_type,label,final")
    assert len(rows) == 13


def test_the_global_plus_map_variant_is_named_in_the_results_and_the_report(tmp_path, mvtec_root, tiny_backbone):
    from raml.evaluate.report import write_report

    path, entries = run_winclip(
        "mvtec",
        mvtec_root,
        tmp_path / "winclip",
        lambda: tiny_backbone,
        workers=0,
        n_resamples=10,
        progress=False,
        image_score="global+map",
    )
    assert set(entries) == {"WinCLIP zero-shot (global+map)"}
    assert entries["WinCLIP zero-shot (global+map)"]["image_score"] == "global+map"
    text = write_report([path], tmp_path / "report").read_text()
    assert "| WinCLIP zero-shot (global+map) | WinCLIP (Jeong et al., CVPR 2023), zero-shot | global+map | 1 |" in text


def test_maps_only_for_the_reports_examples_leave_the_image_scores_unchanged(tmp_path, mvtec_root, tiny_backbone):
    """--maps examples runs the windows for the images a report shows and nothing else; the paper's
    image score (global) is the same bits, and global+map, which needs every map, is refused."""
    from raml.evaluate.results import MAP_EXAMPLES, read_scores_csv

    full, _ = run_winclip(
        "mvtec", mvtec_root, tmp_path / "all", lambda: tiny_backbone, workers=0, n_resamples=10, progress=False
    )
    some, entries = run_winclip(
        "mvtec",
        mvtec_root,
        tmp_path / "examples",
        lambda: tiny_backbone,
        workers=0,
        n_resamples=10,
        progress=False,
        maps="examples",
    )
    entry = entries["WinCLIP zero-shot"]
    assert entry["maps"].startswith("examples") and entry["pixel"]["mean"]["aupro"]["mean"] is None
    assert set(entry["pixel"]["not_available"]) == {"bottle", "metal_nut"}
    all_scores, some_scores = read_scores_csv(full.parent / "scores.csv"), read_scores_csv(some.parent / "scores.csv")
    assert [r["final"] for r in all_scores] == [r["final"] for r in some_scores] and len(all_scores) == 12
    key = "WinCLIP zero-shot"
    shown = np.load(tmp_path / "examples" / "anomaly_maps.npz")
    every = np.load(tmp_path / "all" / "anomaly_maps.npz")
    # one anomalous image of each (category, defect type) while they last, then one normal image
    assert sorted(shown[f"{key}:relpath"].tolist()) == [
        "bottle/test/broken/000.png",
        "bottle/test/good/000.png",
        "bottle/test/scratch/000.png",
        "metal_nut/test/broken/000.png",
    ]
    assert len(shown[f"{key}:relpath"]) == MAP_EXAMPLES
    for relpath, image_map in zip(shown[f"{key}:relpath"], shown[f"{key}:grid"]):
        np.testing.assert_allclose(
            image_map, every[f"{key}:grid"][every[f"{key}:relpath"].tolist().index(relpath)], atol=1e-3
        )  # float16 grids
    assert not (tmp_path / "none").exists()
    run_winclip(
        "mvtec",
        mvtec_root,
        tmp_path / "none",
        lambda: tiny_backbone,
        workers=0,
        n_resamples=10,
        progress=False,
        maps="none",
    )
    assert not (tmp_path / "none" / "anomaly_maps.npz").exists()
    with pytest.raises(ValueError, match="global\\+map uses every image's map: it needs --maps all"):
        run_winclip(
            "mvtec",
            mvtec_root,
            tmp_path / "x",
            lambda: tiny_backbone,
            workers=0,
            progress=False,
            image_score="global+map",
            maps="examples",
        )
