"""Coarse localisation from the cached tiles: a 4x4 anomaly map per image, and its pixel AUROC.

The RAML head scores whole images; where in the image the anomaly is comes from the tiles the
cache already holds. Each 2x2 and 4x4 tile embedding gets the same zero-shot text score as the
global image (``train.infer.text_score``: anomalous vs normal prompt similarity), and the map at a
4x4 cell is the mean of its own tile's score and that of the 2x2 tile containing it, so a defect
seen at either scale shows. This is coarse by construction — 16 cells per image — and the
metric says so in its name (``pixel_auroc_coarse``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cache import CROP_LAYOUT, SCALE_SLICES, UserError
from evaluate.metrics import weighted_pixel_auroc
from extract.pyramid import tile_boxes

GRID = CROP_LAYOUT[-1][0]                         # 4: the finest tile grid, the map's resolution
COARSE_NOTE = (f"coarse: the anomaly map has {GRID}x{GRID} cells per image (one per 4x4 tile); pixel "
               "AUROC is exact for that piecewise-constant map, not comparable to full-resolution maps")


def tile_text_scores(table) -> np.ndarray:
    """[N, 21] zero-shot text score of every crop of every image of ``table``."""
    from train.infer import text_score

    n, crops, dim = table.features.shape
    flat = table.features.reshape(n * crops, dim)
    return np.asarray(text_score(flat, table.text, np.repeat(table.category, crops)), float).reshape(n, crops)


def maps_from_crop_scores(crop_scores: np.ndarray) -> np.ndarray:
    """[N, 21] crop scores → [N, 4, 4] maps: mean of each 4x4 tile and its enclosing 2x2 tile."""
    n = crop_scores.shape[0]
    coarse_side = CROP_LAYOUT[1][0]
    fine = crop_scores[:, SCALE_SLICES[2]].reshape(n, GRID, GRID)
    coarse = crop_scores[:, SCALE_SLICES[1]].reshape(n, coarse_side, coarse_side)
    factor = GRID // coarse_side
    return (fine + np.repeat(np.repeat(coarse, factor, axis=1), factor, axis=2)) / 2


def pool_to_grid(maps: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Average-pool [N, H, W] maps covering the whole image to [N, grid, grid] (for WinCLIP's
    patch-resolution maps, so that both methods are compared at the same coarse resolution)."""
    import torch
    return torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(maps, dtype=torch.float32)[:, None],
                                                   grid)[:, 0].numpy()


def mask_pixels(root: Path, mask_relpath: str, width: int, height: int) -> np.ndarray:
    """Boolean [H, W] defect mask, resized (nearest) to the image when the sizes differ; a
    ``UserError`` naming the mask when it cannot be decoded."""
    try:
        with Image.open(root / mask_relpath) as mask:
            mask = mask.convert("L")
            if mask.size != (width, height):
                mask = mask.resize((width, height), Image.NEAREST)
            return np.asarray(mask) > 0
    except FileNotFoundError:
        raise
    except Exception as err:   # PIL raises many types for damaged bytes
        raise UserError(f"{root / mask_relpath}: a defect mask that cannot be decoded ({type(err).__name__}: "
                        f"{err})") from None


def tile_pixel_counts(root: Path, label: int, mask_relpath: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Defective and defect-free pixel counts of each 4x4 tile of one image."""
    boxes = tile_boxes(width, height)[SCALE_SLICES[2]]
    areas = np.array([(right - left) * (bottom - top) for left, top, right, bottom in boxes], float)
    if not label:
        return np.zeros_like(areas), areas
    mask = mask_pixels(root, mask_relpath, width, height)
    defective = np.array([mask[top:bottom, left:right].sum() for left, top, right, bottom in boxes], float)
    return defective, areas - defective


def coarse_pixel_auroc(maps: np.ndarray, categories, labels, mask_relpaths, heights, widths,
                       root: str | Path | None) -> tuple[dict, dict]:
    """Per-category pixel AUROC of [N, 4, 4] maps against the masks, and the reasons for n/a.

    Anomalous images without a mask cannot be localised and are left out; a category with no
    mask at all, or masks that are not reachable on this machine, is n/a with the reason.
    """
    values, missing = {}, {}
    root = Path(root) if root else None
    categories, labels = np.asarray(categories), np.asarray(labels)
    for category in sorted(set(categories.tolist())):
        rows = np.flatnonzero(categories == category)
        masked = [i for i in rows if labels[i] and mask_relpaths[i]]
        if not masked:
            missing[category] = "no defect masks"
            continue
        if root is None or not (root / mask_relpaths[masked[0]]).is_file():
            missing[category] = f"masks not reachable under {root}"
            continue
        keep = [i for i in rows if not labels[i] or mask_relpaths[i]]
        counts = [tile_pixel_counts(root, labels[i], mask_relpaths[i], int(widths[i]), int(heights[i])) for i in keep]
        try:
            values[category] = weighted_pixel_auroc(maps[keep], [c[0] for c in counts], [c[1] for c in counts])
        except ValueError as err:
            missing[category] = str(err)
    return values, missing
