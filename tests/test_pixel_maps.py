"""Patch tokens in the cache, three map kinds drawn from them, and pixel metrics.

Token geometry and mask targets by hand; the tokens are the encoder's own; adding them re-encodes
only what lacks them and survives kill -9 bit-identical; AUPRO equals a brute-force computation;
each map kind finds a planted local defect; evaluate and report carry the pixel metrics and maps.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from raml.cache import read_cache
from raml.cache.format import TOKENS
from raml.cache.reader import read_token_rows, require_tokens
from raml.cache.synthetic import write_synthetic_cache
from raml.cache.tokens import (
    axis_cells,
    defect_fractions,
    eval_mask,
    map_at,
    token_grid,
    token_setting,
    unpack_eval_masks,
)
from raml.errors import CacheError
from raml.evaluate.baselines.features import greedy_coreset, run_feature_baseline
from raml.evaluate.metrics import pixel_counts, pixel_metrics
from raml.evaluate.report import write_report
from raml.evaluate.run import evaluate_checkpoints
from raml.extract.config import ExtractConfig
from raml.extract.pyramid import load_mask, load_rgb, normalise_crops, pyramid_crops
from raml.extract.run import extract_features
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from tests.conftest import TINY_MODEL
from tests.synthetic import make_mvtec
from tests.test_extract import assert_same_table

PLANTED = {"bottle": (30, 10, 10, 900), "screw": (30, 10, 10, 1023)}  # uneven tiles on purpose (1023 px)
QUICK = dict(epochs=10, lr=3e-3, hidden_dim=32, attn_dim=8, feature_dim=16, pixel_hidden_dim=32)


# --- where the tokens lie, and their targets -------------------------------------------------------


def test_cells_and_defect_fractions_by_hand():
    # 10 px, 4 tiles (edges 0, 2, 5, 7, 10), 2 cells a tile: a cell holds the pixels whose centre it holds
    assert axis_cells(10, 2).tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 6, 7]
    mask = np.zeros((10, 10), bool)
    mask[2:4, 0] = True  # rows 2-3 (cell row 2), column 0 (cell column 0): both pixels of that cell's 2 x 1
    mask[8, 8] = True  # one of the 2 x 2 pixels (rows and columns 7-8) of cell (6, 6)
    grid = token_grid(defect_fractions(mask, 2), 2)
    assert grid[2, 0] == 1.0 and grid[6, 6] == 0.25 and grid.sum() == 1.25
    # storage order: tile-major (tiles row-major), then row-major within the tile
    fractions = defect_fractions(mask, 2)
    assert fractions[4 * 4] == 1.0 and fractions[15 * 4] == 0.25  # cell (2, 0): tile 4, first cell


def test_maps_interpolate_between_cell_centres_where_the_tiles_lie():
    scores = np.arange(64, dtype=float)  # 4 x 4 tiles of 2 x 2 cells
    grid = token_grid(scores, 2)
    # 8 px: every cell is 1 px, so the map at the pixel centres is the grid itself
    assert np.allclose(map_at(grid, 8, 8), grid)
    # 16 px: cells of 2 px; pixel 1's centre (1.5) is 1/4 of the way from cell 0's centre (1) to cell 1's (3)
    wide = map_at(grid, 8, 16)
    assert wide[0, 0] == grid[0, 0] and wide[0, 1] == pytest.approx(0.75 * grid[0, 0] + 0.25 * grid[0, 1])
    assert wide[0, 15] == grid[0, 7]  # beyond the last centre: the last cell
    # uneven tiles: 10 px (tiles of 2, 3, 2, 3 px): the centres of tile 1's cells lie at 2.75 and 4.25 px
    uneven = map_at(np.outer(np.ones(8), np.arange(8.0)), 1, 10, rows=[0.5], cols=[2.75, 3.5, 4.25])
    assert np.allclose(uneven, [[2.0, 2.5, 3.0]])


def test_scoring_masks_sample_the_pixel_under_each_point():
    mask = np.zeros((300, 512), bool)
    mask[:, 256:] = True  # the right half
    points = unpack_eval_masks(eval_mask(mask)[None])[0]
    assert points.shape == (256, 256) and points[:, 128:].all() and not points[:, :128].any()


# --- stage one --------------------------------------------------------------------------------------


def test_tokens_are_the_encoders_own_and_leave_the_features_unchanged(
    mvtec_root, mvtec_cache, mvtec_token_cache, tiny_backbone
):
    """open_clip's own ``output_tokens`` path, projected, normalised and averaged 2x2 by hand."""
    table, plain = read_cache(mvtec_token_cache), read_cache(mvtec_cache)
    assert_same_table(table, plain)  # the same features, bit for bit
    assert table.token_setting == token_setting(4, 32) and table.token_setting["tokens"] == 64
    tokens, _ = read_token_rows(table, [3])
    crops = pyramid_crops(load_rgb(mvtec_root / table.relpath[3]), 32)
    visual = tiny_backbone.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, patches = visual(normalise_crops(crops, tiny_backbone.mean, tiny_backbone.std))
    finally:
        visual.output_tokens = False
    projected = torch.nn.functional.normalize(patches @ visual.proj, dim=-1).numpy()  # [21, 16, 32]
    blocks = projected.reshape(21, 2, 2, 2, 2, 32).mean(axis=(2, 4))  # 4 x 4 patches → 2 x 2
    expected = blocks / np.linalg.norm(blocks, axis=-1, keepdims=True)
    np.testing.assert_allclose(tokens[0].astype(np.float32), expected[5:21].reshape(64, 32), atol=1e-3)  # float16


def test_every_engine_gives_the_tokens_of_its_forward_pass(tiny_backbone, user_cache_dir, mvtec_root):
    """ONNX Runtime's graph has the tokens as a second output: fp32 equal to torch's, int8 close to them."""
    from raml.extract.int8_engine import int8_backbone
    from raml.extract.onnx_engine import onnx_backbone

    crops = pyramid_crops(load_rgb(mvtec_root / "bottle" / "test" / "broken" / "000.png"), 32)
    embeddings, tokens = tiny_backbone.encode_crops_and_tokens(crops)
    assert np.array_equal(embeddings, tiny_backbone.encode_crops(crops)) and tokens.shape == (21, 2, 2, 32)
    fp32 = onnx_backbone(tiny_backbone, cache_root=user_cache_dir / "onnx").encode_crops_and_tokens(crops)
    int8 = int8_backbone(tiny_backbone, cache_root=user_cache_dir / "onnx").encode_crops_and_tokens(crops)
    for ours, reference in zip(fp32, (embeddings, tokens)):
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert (int8[1] * tokens).sum(-1).min() > 0.99  # cosine of unit tokens


def test_mask_targets_are_stored_with_the_tokens(mvtec_root, mvtec_token_cache):
    table = read_cache(mvtec_token_cache)
    row = int(np.flatnonzero(table.label == 1)[0])
    _, masks = read_token_rows(table, [row])
    mask = load_mask(mvtec_root / table.mask_relpath[row], int(table.width[row]), int(table.height[row]))
    np.testing.assert_allclose(table.token_defect[row].astype(np.float32), defect_fractions(mask, 2), atol=1e-3)
    assert np.array_equal(masks[0], eval_mask(mask))
    assert (table.token_defect[table.label == 0] == 0).all()


def test_adding_tokens_re_encodes_only_what_lacks_them(
    mvtec_root, mvtec_cache, mvtec_token_cache, tiny_backbone, tmp_path
):
    cache_dir = tmp_path / "cache"
    shutil.copytree(mvtec_cache, cache_dir)
    with pytest.raises(CacheError, match="have no patch tokens.*extract --dataset mvtec .*--patch-tokens"):
        require_tokens(read_cache(cache_dir))  # a command that needs them says how to add them
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tiny_backbone, name)

        def encode_crops_and_tokens(self, crops):
            calls.append(len(crops) // 21)
            return tiny_backbone.encode_crops_and_tokens(crops)

    summary = extract_features(
        "mvtec", mvtec_root, cache_dir, Counting, ExtractConfig(workers=0, patch_tokens=True), progress=False
    )
    assert (summary.images, summary.tokens_added, sum(calls)) == (0, 20, 20)
    added, direct = read_cache(cache_dir), read_cache(mvtec_token_cache)
    assert_same_table(added, direct)
    assert np.array_equal(read_token_rows(added, range(20))[0], read_token_rows(direct, range(20))[0])
    again = extract_features("mvtec", mvtec_root, cache_dir, Counting, ExtractConfig(workers=0), progress=False)
    assert (again.images, again.tokens_added, sum(calls)) == (0, 0, 20)  # nothing left: nothing encoded
    more = make_mvtec(tmp_path / "more", categories=("bottle", "metal_nut", "pill"))
    grown = extract_features(
        "mvtec", more, cache_dir, Counting, ExtractConfig(workers=0), progress=False
    )  # no --patch-tokens
    assert grown.images == 10 and read_cache(cache_dir).has_tokens.all()  # the cache keeps its tokens


def test_tokens_of_another_setting_are_refused(mvtec_root, mvtec_token_cache, tiny_backbone, tmp_path):
    meta = json.loads((mvtec_token_cache / "cache.json").read_text())
    meta["patch_tokens"].update(per_tile=7, tokens=784)  # as if extracted by a model of 14 x 14 patches
    (tmp_path / "shards").mkdir()
    for name in ("cache", "shards"):
        shutil.copy(mvtec_token_cache / "cache.json", tmp_path / name / "cache.json") if name == "shards" else (
            tmp_path / name
        ).mkdir()
        (tmp_path / name / "cache.json").write_text(json.dumps(meta))
    shutil.copy(next(mvtec_token_cache.glob("*.h5")), tmp_path / "shards")
    with pytest.raises(CacheError, match="holds patch tokens of another setting than .*cache.json records"):
        read_cache(tmp_path / "shards")
    with pytest.raises(CacheError, match="patch tokens of another setting \\(per_tile, tokens differ"):
        extract_features(
            "mvtec", mvtec_root, tmp_path / "cache", lambda: tiny_backbone, ExtractConfig(workers=0), progress=False
        )
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_a_corrupted_token_row_is_named(mvtec_token_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(mvtec_token_cache, cache_dir)
    table = read_cache(cache_dir)
    with h5py.File(table.shards[int(table.shard_file[5])], "r+") as h5:
        h5[TOKENS][int(table.shard_row[5]), 0, 0] += 1
    read_token_rows(table, [4])  # the other rows are fine
    with pytest.raises(CacheError, match="patch tokens of row .* do not match their checksum"):
        read_token_rows(table, [5])


def test_kill_9_while_adding_tokens_then_rerun_gives_the_same_cache(tmp_path, tiny_backbone):
    """SIGKILL to ``extract --patch-tokens`` while it rewrites a cache's shards; the re-run completes the
    cache that one uninterrupted run writes, bit for bit."""
    root = make_mvtec(
        tmp_path / "data", categories=("bottle",), n_train=24, n_test_good=8, n_defect=4, size=(211, 157)
    )  # 40 images
    plain = tmp_path / "plain"
    extract_features(
        "mvtec",
        root,
        plain,
        lambda: tiny_backbone,
        ExtractConfig(workers=0, batch_size=2, shard_size=4),
        progress=False,
    )
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    shutil.copytree(plain, killed)
    shutil.copytree(plain, straight)
    sizes = {path.name: path.stat().st_size for path in plain.glob("*.h5")}
    command = [
        sys.executable,
        "pipeline.py",
        "extract",
        "--dataset",
        "mvtec",
        "--root",
        str(root),
        "--model",
        TINY_MODEL,
        "--random-weights",
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--cache-dir",
        str(killed),
        "--patch-tokens",
    ]
    victim = subprocess.Popen(
        command,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60

    def rewritten():
        return sum(path.stat().st_size > sizes[path.name] for path in killed.glob("*.h5"))

    while rewritten() < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    if (killed / "extract-report-000of001.json").exists() and rewritten() == len(sizes):
        pytest.skip("the run finished before it could be killed")
    table = read_cache(killed)
    done = int(table.has_tokens.sum())
    assert 8 <= done < 40 and done % 4 == 0  # whole shards only
    rerun = extract_features(
        "mvtec",
        root,
        killed,
        lambda: tiny_backbone,
        ExtractConfig(workers=2, batch_size=2, shard_size=4),
        progress=False,
    )  # the cache records its tokens: no flag needed
    assert (rerun.images, rerun.tokens_added) == (0, 40 - done) and not list(killed.glob("*.partial"))
    extract_features(
        "mvtec",
        root,
        straight,
        lambda: tiny_backbone,
        ExtractConfig(workers=2, batch_size=2, shard_size=4, patch_tokens=True),
        progress=False,
    )
    a, b = read_cache(killed), read_cache(straight)
    assert_same_table(a, b)
    assert np.array_equal(a.token_defect, b.token_defect, equal_nan=True)
    (tokens_a, masks_a), (tokens_b, masks_b) = read_token_rows(a, range(40)), read_token_rows(b, range(40))
    assert np.array_equal(tokens_a, tokens_b) and np.array_equal(masks_a, masks_b)


# --- pixel metrics -----------------------------------------------------------------------------------


def _regions(mask):
    """8-connected regions by flood fill (independent of scipy)."""
    labels, count = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start], stack = count, [start]
        while stack:
            r, c = stack.pop()
            for rr in (r - 1, r, r + 1):
                for cc in (c - 1, c, c + 1):
                    if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = count
                        stack.append((rr, cc))
    return [labels == k for k in range(1, count + 1)]


def brute_force_aupro(maps, masks, limit=0.3):
    """MVTec AD's AUPRO, threshold by threshold: FPR over all defect-free pixels, PRO the mean over the
    regions of their share at or above the threshold; trapezoids up to FPR ``limit`` (interpolated), / limit."""
    regions = [(image, region) for image, mask in zip(maps, masks) for region in _regions(mask)]
    normal = np.concatenate([image[~mask] for image, mask in zip(maps, masks)])
    points = [(0.0, 0.0)] + [
        ((normal >= t).mean(), np.mean([(image[r] >= t).mean() for image, r in regions]))
        for t in sorted(set(maps.ravel().tolist()), reverse=True)
    ]
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            x1, y1 = limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_auroc_and_f1_max_equal_brute_force_on_hand_made_masks():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:6] = True  # a 3 x 4 region ...
    masks[0, 5, 6] = True  # ... with a pixel touching it diagonally: the same region
    masks[0, 8:11, 9:11] = True  # a second region
    masks[1, 6:12, 0:3] = True  # image 3 is defect-free
    maps = rng.integers(0, 20, masks.shape).astype(float) + 4 * masks
    assert len(_regions(masks[0])) == 2
    metrics = pixel_metrics(pixel_counts(maps, masks))
    assert abs(metrics["aupro"] - brute_force_aupro(maps, masks)) <= 1e-4
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    f1 = [2 * (maps[masks] >= t).sum() / ((maps >= t).sum() + masks.sum()) for t in np.unique(maps)]
    assert metrics["pixel_f1_max"] == pytest.approx(max(f1))
    perfect = pixel_metrics(pixel_counts(masks.astype(float), masks))
    assert perfect["aupro"] == perfect["pixel_auroc"] == perfect["pixel_f1_max"] == 1.0


def test_pixel_metrics_at_quantile_thresholds_stay_close_to_exact():
    """Over 4,096 distinct scores the curves are taken at 4,096 quantiles: close to the exact values."""
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 48, 48), bool)
    masks[:3, 10:30, 5:25] = True
    maps = rng.random(masks.shape) + 0.4 * masks
    metrics = pixel_metrics(pixel_counts(maps, masks))
    assert abs(metrics["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-4
    assert abs(metrics["aupro"] - brute_force_aupro(maps, masks)) < 1e-3


def test_greedy_coreset_takes_the_farthest_points():
    points = np.array([[0.0, 0], [0.1, 0], [10, 0], [10, 0.1], [0, 10]])
    chosen = greedy_coreset(points, 3)
    assert sorted({int(i) // 2 if i < 4 else 2 for i in chosen}) == [0, 1, 2]  # one of each cluster


# --- each map kind finds a planted local defect --------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A separable synthetic cache with patch tokens: each anomalous image has a defect on 2 x 2 token cells."""
    return read_cache(
        write_synthetic_cache(
            tmp_path_factory.mktemp("planted") / "cache", PLANTED, dim=64, separation=3.0, tokens_per_tile=3
        )
    )


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory, planted):
    runs = tmp_path_factory.mktemp("planted-runs")
    for seed in (0, 1):
        trained = fit(planted, make_config("adaptive", seed=seed, **QUICK))
        assert trained.pixel_head.startswith("on")
        write_run(runs / f"full-seed{seed}", trained)
    return runs


def _pixel_aurocs(entry) -> list:
    return [stats["pixel_auroc"]["mean"] for stats in entry["pixel"]["categories"].values()]


def test_the_trained_pixel_head_finds_the_planted_defect(planted, planted_runs, tmp_path):
    path, entries = evaluate_checkpoints(
        [planted_runs], planted.cache_dir, tmp_path / "raml", n_resamples=100, log=lambda *_: None
    )
    entry = entries["full"]
    assert set(entry["pixel"]["categories"]) == {"bottle", "screw"} and min(_pixel_aurocs(entry)) >= 90
    stats = entry["pixel"]["categories"]["bottle"]["aupro"]
    assert stats["n"] == 2 and len(stats["per_seed"]) == 2 and stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
    maps = np.load(path.parent / "anomaly_maps.npz")
    assert maps["full:grid"].shape == (entry["protocol"]["n_images"], 12, 12)
    fused, fused_entries = evaluate_checkpoints(
        [planted_runs],
        planted.cache_dir,
        tmp_path / "fused",
        map_weight=0.5,
        name="map-fused",
        n_resamples=20,
        log=lambda *_: None,
    )
    with open(fused.parent / "scores.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["final"]) == pytest.approx(
        0.5 * (0.85 * float(row["visual"]) + 0.15 * float(row["text"])) + 0.5 * float(row["map_max"]), abs=2e-6
    )


def test_knn_over_normal_tokens_finds_the_planted_defect(planted, planted_runs, tmp_path):
    _, entries, result = run_feature_baseline(
        "knn-patches", planted, tmp_path / "knn", split_from=planted_runs / "full-seed0", n_resamples=20
    )
    assert min(_pixel_aurocs(entries["knn-patches"])) >= 90
    assert result["extra"]["memory_bank"]["bottle"]["bank"] == 38 * 144  # 30 train/good + 8 test/good, all tokens


def test_zero_shot_text_finds_the_planted_defect_when_the_prompts_describe_it(planted, planted_runs, tmp_path):
    """The synthetic prompts are random; point the normal prompts at the normal tokens' mean and the
    anomalous ones at the defective tokens' mean, as a real CLIP's prompts roughly do."""
    import dataclasses

    text = {}
    for category in planted.categories:
        rows = np.flatnonzero(planted.category == category)
        tokens, _ = read_token_rows(planted, rows)
        defect = planted.token_defect[rows] > 0.5
        text[category] = {
            "normal": tokens[~defect].astype(np.float32).mean(0, keepdims=True),
            "anomalous": tokens[defect].astype(np.float32).mean(0, keepdims=True),
        }
        text[category] = {kind: v / np.linalg.norm(v) for kind, v in text[category].items()}
    _, entries, _ = run_feature_baseline(
        "zero-shot-text",
        dataclasses.replace(planted, text=text),
        tmp_path / "zs",
        split_from=planted_runs / "full-seed0",
        n_resamples=20,
    )
    assert min(_pixel_aurocs(entries["zero-shot-text"])) >= 90


def test_report_shows_pixel_metrics_and_overlays(planted, planted_runs, tmp_path):
    raml, _ = evaluate_checkpoints(
        [planted_runs], planted.cache_dir, tmp_path / "raml", n_resamples=20, log=lambda *_: None
    )
    knn, _, _ = run_feature_baseline(
        "knn-patches", planted, tmp_path / "knn", split_from=planted_runs / "full-seed0", n_resamples=20
    )
    text = write_report([raml, knn], tmp_path / "report").read_text()
    assert "| pixel AUROC % | AUPRO % | pixel F1-max % |" in text
    assert "AUPRO % (FPR ≤ 0.3) per category" in text and "| category | full † | knn-patches † |" in text
    assert "256 x 256 points per image" in text and "trained pixel head" in text
    # the synthetic images are not on disk: the overlay grid says so rather than failing
    assert "not reachable under the dataset root" in text


def test_bench_maps_times_every_step_on_vit_b16s_shape():
    from raml.evaluate.bench import run_maps_bench

    result = run_maps_bench(images=2, normals=3, size=128)
    assert set(result.seconds) == {
        "reading its tokens",
        "pixel head",
        "kNN",
        "zero-shot text",
        "map at 128x128 px",
        "map at the 256x256 scoring points",
    }
    without, with_tokens = result.bytes_per_image
    assert with_tokens - without > 784 * 512 * 2  # ViT-B/16's tokens: 802,816 bytes an image
    assert result.bank == int(0.01 * 3 * 784) and len(result.lines()) == 4
