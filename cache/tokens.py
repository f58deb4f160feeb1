"""The patch tokens a cache may hold beside the crop features: which tokens, where each lies in the
image, the mask targets stored with them, and how a map at any resolution is drawn from them.

**Which tokens** (``token_setting``, recorded in ``cache.json`` and in every shard that holds
tokens, so that two settings never share a cache): the patch tokens of the 16 tiles of the 4x4
grid (crops 5–20), which partition the image, in CLIP's joint image-text space (each patch token
through ``ln_post`` and ``proj`` like the class token, L2-normalised), average-pooled 2x2 within
each tile and L2-normalised again, stored as float16. ViT-B/16 sees a tile as 14x14 patches, so
a tile keeps 7x7 tokens and an image 4·7 x 4·7 = 28x28 = 784 tokens of 512 values: 802,816 bytes,
one cell per ~32 px on a 900-px image.

**Order and position.** An image's tokens are tile-major (tiles row-major in the 4x4 grid), then
row-major within the tile; ``token_grid`` lays them out as one [4p, 4p] grid. Along each axis the
tile edges are those of the crops (``grid_edges``: edge k of n at ⌊k·side/n⌋), and a tile of w px
is cut into p cells of w/p px, as the crop was resized and pooled. Rows and columns are
independent, so everything below works axis by axis.

**Mask targets** (``defect_fractions``, ``eval_mask``), computed by stage one where the masks are
(stage two never reads images): each token's defect fraction, the share of the pixels of its cell
inside the defect mask (a pixel belongs to the cell that holds its centre), the per-token target
of the trained pixel head; and the mask sampled at ``EVAL_MASK_SIDE`` x ``EVAL_MASK_SIDE`` points,
against which every map is scored.

**Maps** (``axis_weights``, ``map_at``): a map at any set of points is the bilinear interpolation
of the token grid between the cells' centres, placed where each cell lies in its tile (not on a
uniform grid), constant beyond the outermost centres. There is one scale, so nothing overlaps.
A grid over the whole image (WinCLIP's 15x15 patches) is the same with one tile.
"""

from __future__ import annotations

import numpy as np

from raml.cache.format import CROP_LAYOUT, SCALE_SLICES, grid_edges

TOKEN_CROPS = SCALE_SLICES[2]  # crops 5–20: the 4x4 tiles, which partition the image
TILES = CROP_LAYOUT[2][0]  # 4 tiles a side
TOKEN_POOL = 2  # each tile's patch grid average-pooled 2x2 (ViT-B/16: 14x14 → 7x7)
TOKEN_SETTING_VERSION = 1
EVAL_MASK_SIDE = 256  # masks and maps are scored at 256 x 256 points per image
EVAL_MASK_BYTES = EVAL_MASK_SIDE * EVAL_MASK_SIDE // 8  # stored as packed bits


def tokens_per_tile(patch_grid: int) -> int:
    """Tokens a tile keeps along each side: its patch grid (14 for ViT-B/16 at 224 px) pooled."""
    return patch_grid // TOKEN_POOL


def token_setting(patch_grid: int, embed_dim: int) -> dict:
    """What the cache records about its tokens; a run with another setting is refused."""
    per_tile = tokens_per_tile(patch_grid)
    return {
        "version": TOKEN_SETTING_VERSION,
        "crops": f"the {TILES}x{TILES} tiles (crops 5-20)",
        "space": "joint image-text space: each patch token through ln_post and proj, L2-normalised",
        "pool": f"{TOKEN_POOL}x{TOKEN_POOL} average within the tile ({patch_grid}x{patch_grid} patches -> "
        f"{per_tile}x{per_tile}), L2-normalised again",
        "per_tile": per_tile,
        "tokens": TILES * TILES * per_tile * per_tile,
        "embed_dim": int(embed_dim),
        "dtype": "float16",
        "defect": "fraction of the token cell's pixels inside the defect mask",
        "eval_mask_side": EVAL_MASK_SIDE,
    }


def token_bytes_per_image(setting: dict) -> int:
    """Bytes an image's patch tokens and mask targets take in a shard (``cache.format``)."""
    return setting["tokens"] * (setting["embed_dim"] + 1) * 2 + EVAL_MASK_BYTES + 8


def axis_cells(size: int, per_tile: int, tiles: int = TILES) -> np.ndarray:
    """[size] index of the token cell (0 .. tiles·per_tile − 1) that holds each pixel along one axis."""
    edges = grid_edges(size, tiles)
    pixels = np.arange(size)
    tile = np.searchsorted(edges, pixels, side="right") - 1
    width = edges[tile + 1] - edges[tile]
    return tile * per_tile + (pixels - edges[tile]) * per_tile // width


def token_grid(scores: np.ndarray, per_tile: int, tiles: int = TILES) -> np.ndarray:
    """Token scores [..., tiles²·p²] in storage order → the grid [..., tiles·p, tiles·p] they cover."""
    lead = scores.shape[:-1]
    blocks = scores.reshape(*lead, tiles, tiles, per_tile, per_tile)
    return np.moveaxis(blocks, -3, -2).reshape(*lead, tiles * per_tile, tiles * per_tile)


def grid_tokens(grid: np.ndarray, per_tile: int, tiles: int = TILES) -> np.ndarray:
    """The inverse of ``token_grid``: [..., tiles·p, tiles·p] → [..., tiles²·p²] in storage order."""
    lead = grid.shape[:-2]
    blocks = grid.reshape(*lead, tiles, per_tile, tiles, per_tile)
    return np.moveaxis(blocks, -2, -3).reshape(*lead, -1)


def defect_fractions(mask: np.ndarray, per_tile: int) -> np.ndarray:
    """[tiles²·p²] float32: the share of each token cell's pixels inside ``mask`` ([H, W] bool)."""
    height, width = mask.shape
    rows, cols = axis_cells(height, per_tile), axis_cells(width, per_tile)
    row_starts = np.flatnonzero(np.diff(rows, prepend=-1))  # cells are runs of pixels along each axis
    col_starts = np.flatnonzero(np.diff(cols, prepend=-1))
    defective = np.add.reduceat(np.add.reduceat(mask.astype(np.float64), row_starts, axis=0), col_starts, axis=1)
    area = np.outer(np.diff(np.append(row_starts, height)), np.diff(np.append(col_starts, width)))
    return grid_tokens((defective / area).astype(np.float32), per_tile)


def eval_points(size: int, count: int = EVAL_MASK_SIDE) -> np.ndarray:
    """Positions (px, continuous) of ``count`` evenly spaced sample points along a side of ``size`` px."""
    return (np.arange(count) + 0.5) * size / count


def eval_mask(mask: np.ndarray) -> np.ndarray:
    """[EVAL_MASK_SIDE²/8] uint8: ``mask`` ([H, W] bool) at the scoring points (the pixel under each),
    as packed bits."""
    height, width = mask.shape
    rows = np.floor(eval_points(height)).astype(int)
    cols = np.floor(eval_points(width)).astype(int)
    return np.packbits(mask[np.ix_(rows, cols)].ravel())


def unpack_eval_masks(packed: np.ndarray) -> np.ndarray:
    """[..., EVAL_MASK_BYTES] packed bits → [..., EVAL_MASK_SIDE, EVAL_MASK_SIDE] bool."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), axis=-1).astype(bool)
    return bits.reshape(*packed.shape[:-1], EVAL_MASK_SIDE, EVAL_MASK_SIDE)


def axis_weights(size: int, positions: np.ndarray, per_tile: int, tiles: int = TILES) -> np.ndarray:
    """[len(positions), tiles·p] bilinear weights of the token cells at ``positions`` (px, continuous,
    along a side of ``size`` px): each position between the centres of two neighbouring cells of its
    tile row, placed where the cells lie; beyond the outermost centres, the outermost cell."""
    edges = grid_edges(size, tiles).astype(np.float64)
    positions = np.asarray(positions, np.float64)
    tile = np.clip(np.searchsorted(edges, positions, side="right") - 1, 0, tiles - 1)
    width = edges[tile + 1] - edges[tile]
    cells = tiles * per_tile  # at least 2 (a 4x4 grid of tiles, or WinCLIP's patch grid)
    cell = np.clip(tile * per_tile + (positions - edges[tile]) * per_tile / width - 0.5, 0, cells - 1)
    low = np.minimum(np.floor(cell).astype(int), cells - 2)
    weights = np.zeros((len(positions), cells))
    weights[np.arange(len(positions)), low] = 1 - (cell - low)
    weights[np.arange(len(positions)), low + 1] = cell - low
    return weights


def map_at(grid: np.ndarray, height: int, width: int, *, rows=None, cols=None, tiles: int = TILES) -> np.ndarray:
    """The map of a token grid ([G, G], ``G = tiles·p``) over an image of ``height`` x ``width`` px,
    at the pixel centres (default: [H, W] float32, the image's own resolution) or at the positions
    ``rows`` x ``cols`` (e.g. ``eval_points``)."""
    per_tile = grid.shape[-1] // tiles
    rows = np.arange(height) + 0.5 if rows is None else rows
    cols = np.arange(width) + 0.5 if cols is None else cols
    return (
        axis_weights(height, rows, per_tile, tiles)
        @ np.asarray(grid, np.float64)
        @ axis_weights(width, cols, per_tile, tiles).T
    ).astype(np.float32)


def eval_maps(grids: np.ndarray, heights, widths, tiles: int = TILES) -> np.ndarray:
    """Each grid's map at the ``EVAL_MASK_SIDE``² scoring points of its image: [N, S, S] float32."""
    return (
        np.stack(
            [
                map_at(grid, int(h), int(w), rows=eval_points(int(h)), cols=eval_points(int(w)), tiles=tiles)
                for grid, h, w in zip(grids, heights, widths)
            ]
        )
        if len(grids)
        else np.zeros((0, EVAL_MASK_SIDE, EVAL_MASK_SIDE), np.float32)
    )


def add_tokens_command(meta: dict, cache_dir) -> str:
    """The ``extract`` command that adds patch tokens to the cache of fingerprint ``meta``: its dataset,
    its backbone (as recorded in ``cache.json``, named in full: the command holds whatever extract's
    defaults are), an engine of its precision, and ``--patch-tokens``."""
    dataset, source = meta.get("dataset") or {}, meta.get("backbone_source") or {}
    kind = dataset.get("kind", "KIND")
    words = ["raml extract", f"--dataset {kind}"]
    if dataset.get("root") and kind != "textile":
        words.append(f"--root {dataset['root']}")
    words.append(f"--cache-dir {cache_dir}")
    model = source.get("model") or meta.get("backbone")
    if model:
        words.append(f"--model {model}")
    if meta.get("random_weights"):
        words.append("--random-weights")
    elif source.get("weights_file"):
        words.append(f"--weights {source['weights_file']}")
    elif meta.get("weights"):
        words.append(f"--pretrained {meta['weights']}")
    if meta.get("precision", "fp32") != "fp32":  # auto keeps to the cache's precision (int8, bf16)
        words.append("--engine auto")
    return " ".join(words + ["--patch-tokens"])
