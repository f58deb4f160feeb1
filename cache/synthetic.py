"""Synthetic feature caches for ``bench train`` and the tests: real shard files, made-up features.

Each crop is its category's "normal" direction plus noise of about the same norm; an anomalous
image adds a defect direction to one 4×4 tile (strength ``separation``), its 2×2 parent (half)
and the global crop (a quarter), the way a small defect shows up in the crop pyramid.
``separation`` ≥ 1 makes the classes separable; small values make them hard. The numbers such
a cache yields test code, not the method.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cache import N_CROPS, ShardRows, claim_cache, fingerprint, write_shard

# MVTec AD's shape: category → (train/good, test/good, test/defective) images, original side (px).
MVTEC_SHAPE = {
    "bottle": (209, 20, 63, 900), "cable": (224, 58, 92, 1024), "capsule": (219, 23, 109, 1000),
    "carpet": (280, 28, 89, 1024), "grid": (264, 21, 57, 1024), "hazelnut": (391, 40, 70, 1024),
    "leather": (245, 32, 92, 1024), "metal_nut": (220, 22, 93, 700), "pill": (267, 26, 141, 800),
    "screw": (320, 41, 119, 1024), "tile": (230, 33, 84, 840), "toothbrush": (60, 12, 30, 1024),
    "transistor": (213, 60, 40, 1024), "wood": (247, 19, 60, 1024), "zipper": (240, 32, 119, 1024),
}   # 3,629 train + 1,725 test = 5,354 images
PROMPTS_PER_KIND = 25   # as many as extract/prompts.py's ensemble


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_synthetic_cache(cache_dir, shape=None, dim: int = 512, separation: float = 1.0, seed: int = 0,
                          input_size: int = 224, backbone: str = "synthetic", shard_size: int = 256) -> Path:
    """Write a cache of ``shape`` (default ``MVTEC_SHAPE``) with ``dim``-wide features."""
    shape = MVTEC_SHAPE if shape is None else shape
    rng = np.random.default_rng(seed)
    meta = fingerprint(backbone=backbone, weights="synthetic", random_weights=True, input_size=input_size,
                       embed_dim=dim, code_version="synthetic", dataset={"kind": "synthetic"},
                       prompts={}, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    claim_cache(cache_dir, meta)
    rows, shards = ShardRows(), 0
    text = {}

    def flush():
        nonlocal rows, shards
        write_shard(Path(cache_dir) / f"features-000of001-{shards:05d}.h5", rows, meta, text, engine="synthetic")
        rows, shards = ShardRows(), shards + 1

    for category, (n_train, n_good, n_defect, side) in shape.items():
        normal_direction, defect_direction = _unit(rng.normal(size=(2, dim)))
        text[category] = {kind: _unit(rng.normal(size=(PROMPTS_PER_KIND, dim))).astype(np.float32)
                          for kind in ("normal", "anomalous")}
        groups = (("train", "good", n_train), ("test", "good", n_good), ("test", "defect", n_defect))
        for split, folder, count in groups:
            for i in range(count):
                crops = normal_direction + rng.normal(size=(N_CROPS, dim)) / np.sqrt(dim)   # noise of norm ~1
                if folder == "defect":
                    tile = 5 + rng.integers(16)
                    row, col = divmod(tile - 5, 4)
                    parent = 1 + (row // 2) * 2 + col // 2
                    for crop, strength in ((tile, 1.0), (parent, 0.5), (0, 0.25)):
                        crops[crop] += separation * strength * defect_direction
                rows.features.append(_unit(crops).astype(np.float16))
                rows.records.append(SimpleNamespace(category=category, defect_type=folder, split=split,
                                                    label=int(folder != "good"), mask_relpath="",
                                                    relpath=f"{category}/{split}/{folder}/{i:03d}.png"))
                rows.sizes.append((side, side))
                if len(rows) == shard_size:
                    flush()
    if len(rows):
        flush()
    return Path(cache_dir)
