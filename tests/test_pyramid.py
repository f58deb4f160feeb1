"""The 21-crop pyramid cuts real tiles from the full-resolution image, and bad images fail clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

from raml.extract.datasets import read_dataset
from raml.extract.loader import CropBatches
from raml.extract.pyramid import (
    MIN_IMAGE_SIDE,
    BadImageError,
    load_rgb,
    normalise_crops,
    pyramid_crops,
    pyramid_pixels,
    tile_boxes,
)
from tests.synthetic import make_folder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def pil_path_pixels(image, size, mean, std):
    """The preprocessing that wrote every cache before uint8 crops, verbatim: PIL crop and bicubic
    resize, then float32 normalisation in numpy, one crop at a time."""
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(std, np.float32).reshape(3, 1, 1)
    crops = np.empty((21, 3, size, size), np.float32)
    for i, box in enumerate(tile_boxes(*image.size)):
        tile = image.crop(box).resize((size, size), Image.BICUBIC)
        crops[i] = (np.asarray(tile, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    return crops


def noisy_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", [(97, 83), (1023, 701), (65, 257), (130, 71)])
def test_uint8_crops_normalised_in_torch_equal_the_pil_path(width, height):
    image = noisy_image(width, height)
    crops = pyramid_crops(image, 24)
    assert crops.shape == (21, 3, 24, 24) and crops.dtype == torch.uint8
    pixels = normalise_crops(crops, CLIP_MEAN, CLIP_STD)
    assert pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert np.abs(pixels.numpy() - pil_path_pixels(image, 24, CLIP_MEAN, CLIP_STD)).max() <= 1e-6


def test_crops_handed_over_by_worker_processes_equal_the_pil_path(tmp_path):
    """Through the real hand-over: two worker processes, shared memory, batches of 2 and 1."""
    root = make_folder(tmp_path, category="odd", n_good=3, defects=(), size=(101, 67))
    _, records = read_dataset("folder", root)
    with CropBatches(root, records, [[0, 1], [2]], 32, workers=2, device=torch.device("cpu")) as loader:
        batches = list(loader)
    assert [[image.index for image in batch.images] for batch in batches] == [[0, 1], [2]]
    assert [image.size for batch in batches for image in batch.images] == [(67, 101)] * 3
    handed_over = torch.cat([normalise_crops(batch.crops, CLIP_MEAN, CLIP_STD) for batch in batches]).numpy()
    expected = np.concatenate([pil_path_pixels(load_rgb(root / r.relpath), 32, CLIP_MEAN, CLIP_STD) for r in records])
    assert handed_over.shape == (63, 3, 32, 32)
    assert np.abs(handed_over - expected).max() <= 1e-6


def test_loader_reports_a_bad_file_in_its_batch_and_goes_on(tmp_path):
    root = make_folder(tmp_path, category="odd", n_good=3, defects=(), size=(90, 90))
    (root / "odd" / "good" / "img1.png").write_bytes(b"not a png")
    _, records = read_dataset("folder", root)
    with CropBatches(root, records, [[0, 1], [2]], 32, workers=2, device=torch.device("cpu")) as loader:
        first, second = list(loader)
    assert [image.index for image in first.good] == [0] and first.crops.shape == (21, 3, 32, 32)
    assert [(image.index, image.reason) for image in first.bad] == [(1, "not an image PIL can read")]
    assert [image.index for image in second.good] == [2]


def test_loader_stops_when_a_slot_was_overwritten_before_it_was_read(tmp_path, monkeypatch):
    """The guard of the slot ring: with too few slots the workers overwrite images not yet read."""
    root = make_folder(tmp_path, category="odd", n_good=8, defects=(), size=(90, 90))
    _, records = read_dataset("folder", root)
    monkeypatch.setattr("raml.extract.loader.slot_count", lambda batch_size, workers, prefetch: 2)
    with CropBatches(root, records, [[0, 1, 2, 3], [4, 5, 6, 7]], 32, workers=2, device=torch.device("cpu")) as loader:
        with pytest.raises(RuntimeError, match=r"slots of images \[0, 1[],]"):
            list(loader)


def test_loader_refuses_batches_that_do_not_cover_the_records_in_order(tmp_path):
    root = make_folder(tmp_path, category="odd", n_good=3, defects=(), size=(90, 90))
    _, records = read_dataset("folder", root)
    with pytest.raises(ValueError, match="in order"):
        CropBatches(root, records, [[0], [2, 1]], 32, workers=0, device=torch.device("cpu"))


def colour_of(row, col):
    """A distinct solid colour for each cell of the 4x4 grid."""
    return (16 * row + 10, 16 * col + 10, 200 - 10 * (4 * row + col))


def grid_image(width, height):
    """An image whose 4x4 tiles (cut at floor(k·size/4)) are solid, distinct colours."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            pixels[r * height // 4 : (r + 1) * height // 4, c * width // 4 : (c + 1) * width // 4] = colour_of(r, c)
    return Image.fromarray(pixels)


def test_tile_boxes_cover_uneven_image_exactly():
    width, height = 1023, 701
    boxes = tile_boxes(width, height)
    assert len(boxes) == 21
    assert boxes[0] == (0, 0, 1023, 701)
    assert boxes[1:5] == [(0, 0, 511, 350), (511, 0, 1023, 350), (0, 350, 511, 701), (511, 350, 1023, 701)]
    for scale in (slice(1, 5), slice(5, 21)):
        covered = np.zeros((height, width), int)
        for left, top, right, bottom in boxes[scale]:
            covered[top:bottom, left:right] += 1
        assert (covered == 1).all()  # every pixel in exactly one tile: no gaps, no overlap
    assert boxes[5 + 4 * 3 + 3] == (767, 525, 1023, 701)  # last 4x4 tile, row-major


@pytest.mark.parametrize("width,height", [(1023, 765), (96, 96), (130, 71)])
def test_each_fine_tile_is_exactly_its_region(width, height):
    crops = pyramid_pixels(grid_image(width, height), 24, mean=(0, 0, 0), std=(1, 1, 1))
    assert crops.shape == (21, 3, 24, 24) and crops.dtype == np.float32
    for r in range(4):
        for c in range(4):
            tile = crops[5 + 4 * r + c]
            expected = np.array(colour_of(r, c), np.float32).reshape(3, 1, 1) / 255
            np.testing.assert_allclose(tile, np.broadcast_to(expected, tile.shape), atol=1e-6)


def test_coarse_tiles_hold_their_four_children_and_global_holds_all():
    crops = pyramid_pixels(grid_image(1023, 765), 64, mean=(0, 0, 0), std=(1, 1, 1))

    def centre_colour(crop, r, c, cells):  # colour at the centre of cell (r, c) of a cells x cells split
        step = 64 // cells
        return tuple(np.round(crop[:, r * step + step // 2, c * step + step // 2] * 255).astype(int))

    for tr in range(2):
        for tc in range(2):
            crop = crops[1 + 2 * tr + tc]
            for r in range(2):
                for c in range(2):
                    assert centre_colour(crop, r, c, 2) == colour_of(2 * tr + r, 2 * tc + c)
    for r in range(4):
        for c in range(4):
            assert centre_colour(crops[0], r, c, 4) == colour_of(r, c)


def test_normalisation_uses_model_mean_and_std():
    image = Image.new("RGB", (64, 64), (255, 0, 51))
    crops = pyramid_pixels(image, 8, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1))
    np.testing.assert_allclose(crops[:, :, 0, 0], np.tile([1.0, -2.0, 0.0], (21, 1)), atol=1e-6)


def save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_convertible_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGB", (80, 70), (120, 30, 200)).convert(mode)
    path = save(tmp_path, "img.png" if mode != "CMYK" else "img.jpg", image)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (80, 70)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.full((70, 80), 65535, np.uint16)
    values[:, :40] = 257 * 100
    path = save(tmp_path, "deep.png", Image.fromarray(values))
    rgb = np.asarray(load_rgb(path))
    assert rgb[0, 0].tolist() == [100, 100, 100] and rgb[0, -1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image"), "not an image"),
        (
            lambda p: (
                Image.new("RGB", (200, 200), (1, 2, 3)).save(p, format="PNG"),
                p.write_bytes(p.read_bytes()[:300]),
            ),
            "cannot decode",
        ),
        (lambda p: Image.new("RGB", (MIN_IMAGE_SIDE - 1, 200)).save(p, format="PNG"), "too small"),
        (lambda p: Image.new("F", (80, 80)).save(p, format="TIFF"), "unsupported image mode"),
    ],
)
def test_bad_images_name_file_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert str(path) in str(info.value) and reason in str(info.value)
