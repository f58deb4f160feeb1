"""Synthetic feature caches for ``bench train`` and the tests: real shard files, made-up features.

Each crop is its category's "normal" direction plus noise of about the same norm; an anomalous
image adds a defect direction to one 4×4 tile (strength ``separation``), its 2×2 parent (half)
and the global crop (a quarter), the way a small defect shows up in the crop pyramid.
``separation`` ≥ 1 makes the classes separable; small values make them hard. The numbers such
a cache yields test code, not the method.

With ``tokens_per_tile`` it also holds patch tokens (``cache.tokens``), made the same way: each
token its category's normal token direction plus noise, and in an anomalous image a planted local
defect, a 2x2 block of token cells inside the defective tile that gets a defect direction; its
mask is exactly those cells' pixels, from which the defect fractions and the scoring mask are
computed as stage one computes them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from raml.cache import N_CROPS, ShardRows, claim_cache, fingerprint, write_shard
from raml.cache.format import claim_token_setting
from raml.cache.tokens import TILES, TOKEN_POOL, axis_cells, defect_fractions, eval_mask, token_setting

# MVTec AD's shape: category → (train/good, test/good, test/defective) images, original side (px).
MVTEC_SHAPE = {
    "bottle": (209, 20, 63, 900),
    "cable": (224, 58, 92, 1024),
    "capsule": (219, 23, 109, 1000),
    "carpet": (280, 28, 89, 1024),
    "grid": (264, 21, 57, 1024),
    "hazelnut": (391, 40, 70, 1024),
    "leather": (245, 32, 92, 1024),
    "metal_nut": (220, 22, 93, 700),
    "pill": (267, 26, 141, 800),
    "screw": (320, 41, 119, 1024),
    "tile": (230, 33, 84, 840),
    "toothbrush": (60, 12, 30, 1024),
    "transistor": (213, 60, 40, 1024),
    "wood": (247, 19, 60, 1024),
    "zipper": (240, 32, 119, 1024),
}  # 3,629 train + 1,725 test = 5,354 images
PROMPTS_PER_KIND = 25  # as many as extract/prompts.py's ensemble


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_synthetic_cache(
    cache_dir,
    shape=None,
    dim: int = 512,
    separation: float = 1.0,
    seed: int = 0,
    input_size: int = 224,
    backbone: str = "synthetic",
    shard_size: int = 256,
    tokens_per_tile: int | None = None,
) -> Path:
    """Write a cache of ``shape`` (default ``MVTEC_SHAPE``) with ``dim``-wide features, and with
    ``tokens_per_tile`` patch tokens of that many cells a tile side (see the module docstring)."""
    shape = MVTEC_SHAPE if shape is None else shape
    rng = np.random.default_rng(seed)
    meta = fingerprint(
        backbone=backbone,
        weights="synthetic",
        random_weights=True,
        input_size=input_size,
        embed_dim=dim,
        code_version="synthetic",
        dataset={"kind": "synthetic"},
        prompts={},
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    setting = None if tokens_per_tile is None else token_setting(TOKEN_POOL * tokens_per_tile, dim)
    claim_cache(cache_dir, meta)
    if setting is not None:
        claim_token_setting(cache_dir, setting)
    rows, shards = ShardRows(), 0
    text = {}

    def flush():
        nonlocal rows, shards
        write_shard(
            Path(cache_dir) / f"features-000of001-{shards:05d}.h5",
            rows,
            meta,
            text,
            engine="synthetic",
            token_setting=setting,
        )
        rows, shards = ShardRows(), shards + 1

    for category, (n_train, n_good, n_defect, side) in shape.items():
        normal_direction, defect_direction = _unit(rng.normal(size=(2, dim)))
        token_directions = _unit(rng.normal(size=(2, dim)))  # a token's normal and defect directions
        text[category] = {
            kind: _unit(rng.normal(size=(PROMPTS_PER_KIND, dim))).astype(np.float32) for kind in ("normal", "anomalous")
        }
        groups = (("train", "good", n_train), ("test", "good", n_good), ("test", "defect", n_defect))
        for split, folder, count in groups:
            for i in range(count):
                crops = normal_direction + rng.normal(size=(N_CROPS, dim)) / np.sqrt(dim)  # noise of norm ~1
                tile = None
                if folder == "defect":
                    tile = 5 + rng.integers(16)
                    row, col = divmod(tile - 5, 4)
                    parent = 1 + (row // 2) * 2 + col // 2
                    for crop, strength in ((tile, 1.0), (parent, 0.5), (0, 0.25)):
                        crops[crop] += separation * strength * defect_direction
                rows.features.append(_unit(crops).astype(np.float16))
                if setting is not None:
                    _add_tokens(
                        rows,
                        rng,
                        token_directions,
                        separation,
                        tokens_per_tile,
                        side,
                        None if tile is None else tile - 5,
                    )
                rows.records.append(
                    SimpleNamespace(
                        category=category,
                        defect_type=folder,
                        split=split,
                        label=int(folder != "good"),
                        mask_relpath="",
                        relpath=f"{category}/{split}/{folder}/{i:03d}.png",
                    )
                )
                rows.sizes.append((side, side))
                if len(rows) == shard_size:
                    flush()
    if len(rows):
        flush()
    return Path(cache_dir)


def _add_tokens(
    rows: ShardRows,
    rng,
    directions: np.ndarray,
    separation: float,
    per_tile: int,
    side: int,
    defective_tile: int | None,
) -> None:
    """One image's tokens and mask targets (see the module docstring); ``defective_tile`` (0–15) holds
    the planted defect, or None for a normal image."""
    normal, defect = directions
    cells = TILES * per_tile
    tokens = normal + rng.normal(size=(cells * cells, len(normal))) / np.sqrt(len(normal))
    mask = np.zeros((side, side), bool)
    if defective_tile is not None:
        tile_row, tile_col = divmod(defective_tile, TILES)
        top, left = (tile_row * per_tile + rng.integers(per_tile - 1), tile_col * per_tile + rng.integers(per_tile - 1))
        grid_cells = axis_cells(side, per_tile)
        in_rows, in_cols = np.isin(grid_cells, (top, top + 1)), np.isin(grid_cells, (left, left + 1))
        mask = in_rows[:, None] & in_cols[None, :]
    fractions = defect_fractions(mask, per_tile)
    tokens += separation * fractions[:, None] * defect
    rows.tokens.append(_unit(tokens).astype(np.float16))
    rows.token_defect.append(fractions)
    rows.eval_masks.append(eval_mask(mask))
