"""The 21-crop pyramid: decode an image once at full resolution and cut real tiles from it.

Crop order (``cache.CROP_LAYOUT``): index 0 is the whole image, 1-4 the 2x2 grid, 5-20 the 4x4
grid, each grid row-major. Tiles are cut from the original pixels, not from a resized copy: that
is where the extra effective resolution comes from (docs/method.md#the-21-crop-pyramid; the original code's first mistake).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raml.cache import CROP_LAYOUT, N_CROPS
from raml.cache.format import grid_edges
from raml.cache.tokens import EVAL_MASK_BYTES, TILES, defect_fractions, eval_mask
from raml.errors import UserError, printable

if TYPE_CHECKING:  # torch is imported where crops are made, not by every reader of this module
    import torch

# Each 4x4 tile must still be a real image region: 16 px a side at the finest scale.
MIN_IMAGE_SIDE = 16 * max(cols for _, cols in CROP_LAYOUT)
# The largest image RAML decodes: 178,956,970 px (e.g. 13,377 x 13,377), 537 MB as 8-bit RGB in each
# decoding worker. It is Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS at its default), so the
# two checks agree; a larger header is a decompression bomb or an image to downscale first. Pillow
# warns (DecompressionBombWarning) from half this size on; such images are still decoded.
MAX_IMAGE_PIXELS = 178_956_970
# Modes PIL converts to RGB without losing meaning; 16-bit grey is rescaled by hand (see below).
_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class BadImageError(UserError):
    """An image that cannot become 21 crops; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{printable(str(path))}: {reason}")
        self.path, self.reason = printable(str(path)), reason


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully as 8-bit RGB, upright, or raise ``BadImageError`` saying why not.

    Upright: an EXIF Orientation tag (phone photos carry one; camera-mounted industrial images
    normally do not) is applied, so the crops, masks and heatmaps are those of the image every
    viewer shows. An image over ``MAX_IMAGE_PIXELS`` is refused from its header, before decoding.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    path,
                    f"{pixels:,} px ({image.width}x{image.height}), over RAML's limit of "
                    f"{MAX_IMAGE_PIXELS:,} px: a decompression bomb, or an image to downscale",
                )
            image.load()  # decode now: a truncated file fails here, not later in a worker
            ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(path, image)
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:  # Pillow checks first, in Image.open; same limit by default
        raise BadImageError(path, f"refused by Pillow's decompression-bomb check: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image PIL can read") from None
    except (
        Exception
    ) as err:  # PIL's decoders raise many types for damaged bytes (OSError, SyntaxError, struct.error...)
        raise BadImageError(path, f"cannot decode ({type(err).__name__}: {err})") from None
    if min(rgb.size) < MIN_IMAGE_SIDE:
        raise BadImageError(
            path,
            f"too small ({rgb.width}x{rgb.height} px); the 4x4 grid needs at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}",
        )
    return rgb


def load_mask(path: Path, width: int, height: int, image: Path | None = None) -> np.ndarray:
    """The defect mask at ``path`` as bool [height, width] (non-zero = defect), upright like
    ``load_rgb``; ``BadImageError`` if it is unreadable or, upright, not ``width`` x ``height`` px.

    A mask of another size is refused, not resized: MVTec AD's and VisA's masks always have their
    image's size, so a mismatch means the wrong file (another image's mask, an export at another
    resolution), and stretching it would give pixel targets that look valid and are not. No
    tolerance of a pixel or two: we know of no dataset whose masks' sizes are rounded. ``image``:
    the image the mask belongs to; the error is then the image's (``--skip-bad`` skips it) and
    names both files, else the mask's.
    """
    what = f"its defect mask {printable(str(path))}" if image else "defect mask"
    try:
        with Image.open(path) as mask:
            if mask.width * mask.height > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    image or path,
                    f"{what} is {mask.width}x{mask.height} px, over RAML's limit of {MAX_IMAGE_PIXELS:,} px",
                )
            mask = ImageOps.exif_transpose(mask).convert("L")
            if mask.size != (width, height):
                raise BadImageError(
                    image or path,
                    f"{what} is {mask.width}x{mask.height} px but the image is {width}x{height} px: a mask must "
                    "have its image's size (another image's mask, or an export at another resolution?)",
                )
            return np.asarray(mask) > 0
    except BadImageError:
        raise
    except Exception as err:  # missing, truncated or not an image: PIL raises many types for damaged bytes
        raise BadImageError(image or path, f"{what} cannot be read ({type(err).__name__}: {err})") from None


def token_targets(root: Path, record, height: int, width: int, per_tile: int) -> tuple[np.ndarray, np.ndarray]:
    """What the cache stores beside an image's patch tokens (``cache.tokens``): each token's defect
    fraction [T] float32 and the mask at the scoring points (packed bits). A normal image has no
    defect; an anomalous image without a mask has unknown fractions (NaN) and an empty scoring mask
    (it is left out of the pixel metrics)."""
    if record.label and record.mask_relpath:
        # a bad mask is the image's problem: it cannot be stored without its targets
        mask = load_mask(Path(root) / record.mask_relpath, width, height, image=Path(root) / record.relpath)
        return defect_fractions(mask, per_tile), eval_mask(mask)
    count = TILES * TILES * per_tile * per_tile
    return np.full(count, np.nan if record.label else 0.0, np.float32), np.zeros(EVAL_MASK_BYTES, np.uint8)


def _to_rgb(path: Path, image: Image.Image) -> Image.Image:
    if image.mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 → RGB conversion clips at 255; scale the full 16-bit range instead.
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise BadImageError(path, f"unsupported mode {image.mode} with values outside 0..65535")
        grey = np.round(values / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    raise BadImageError(
        path, f"unsupported image mode {image.mode!r} (expected RGB, grey, palette, RGBA, CMYK or 16-bit grey)"
    )


def tile_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the 21 crops. Uneven sizes: edge k of n is floor(k·size/n),
    so the tiles of a grid cover the image exactly, without overlap, differing by at most 1 px."""
    boxes = []
    for rows, cols in CROP_LAYOUT:
        x, y = grid_edges(width, cols).tolist(), grid_edges(height, rows).tolist()
        boxes += [(x[c], y[r], x[c + 1], y[r + 1]) for r in range(rows) for c in range(cols)]
    return boxes


def pyramid_crops(image: Image.Image, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 21 crops of ``image`` as uint8 [21, 3, size, size]: what the loader hands over.

    Each tile is resized to ``size`` x ``size`` (bicubic, as CLIP's own preprocessing) without a
    centre crop, so no part of a tile is thrown away. The tensor is channels-last in memory (PIL's
    own pixel order, so nothing is transposed here); ``normalise_crops`` makes it float and
    contiguous, on the encoder's device. It is a quarter of the bytes of float32 crops. ``out``:
    such a tensor to fill instead of a new one (the loader's shared-memory slots).
    """
    import torch  # here, not at the top: listing and checking a cache must not import torch

    crops = torch.empty((N_CROPS, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2) if out is None else out
    pixels = crops.permute(0, 2, 3, 1).numpy()  # a view [21, size, size, 3]: writing it fills ``crops``
    for i, box in enumerate(tile_boxes(*image.size)):
        pixels[i] = np.asarray(image.crop(box).resize((size, size), Image.BICUBIC))
    return crops


def normalise_crops(crops: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 crops [N, 3, S, S] (any memory layout) → float32 ``(crops / 255 - mean) / std``,
    contiguous, on the device ``crops`` are on.

    Bit for bit the arithmetic of the numpy preprocessing that wrote earlier caches (float32
    division by 255, subtraction of the mean, division by the std), so their shards and new ones
    agree. The constants are divided as tensors: a Python scalar divisor lets CUDA multiply by
    its reciprocal instead, which rounds differently.
    """
    import torch

    scale, mean, std = _normalisation_constants(tuple(mean), tuple(std), crops.device)
    pixels = crops.to(torch.float32, memory_format=torch.contiguous_format)
    return pixels.div_(scale).sub_(mean).div_(std)


@functools.lru_cache(maxsize=8)
def _normalisation_constants(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """255, mean and std as float32 tensors on ``device``, made once (not copied there per batch)."""
    import torch

    constants = torch.tensor((255.0, *mean, *std), dtype=torch.float32, device=device)
    return constants[0], constants[1:4].view(3, 1, 1), constants[4:7].view(3, 1, 1)


def pyramid_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """The normalised crops of one image as float32 numpy [21, 3, size, size], as ONNX graphs and
    the deployment script (evaluate/deploy/predict_onnx.py, which restates this without torch) take them."""
    return normalise_crops(pyramid_crops(image, size), mean, std).numpy()
