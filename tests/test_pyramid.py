"""The 21-crop pyramid cuts real tiles from the full-resolution image, and bad images fail clearly."""
import numpy as np
import pytest
from PIL import Image

from extract.pyramid import MIN_IMAGE_SIDE, BadImageError, load_rgb, pyramid_pixels, tile_boxes


def colour_of(row, col):
    """A distinct solid colour for each cell of the 4x4 grid."""
    return (16 * row + 10, 16 * col + 10, 200 - 10 * (4 * row + col))


def grid_image(width, height):
    """An image whose 4x4 tiles (cut at floor(k·size/4)) are solid, distinct colours."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            pixels[r * height // 4:(r + 1) * height // 4, c * width // 4:(c + 1) * width // 4] = colour_of(r, c)
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


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"this is not an image"), "not an image"),
    (lambda p: (Image.new("RGB", (200, 200), (1, 2, 3)).save(p, format="PNG"),
                p.write_bytes(p.read_bytes()[:300])), "cannot decode"),
    (lambda p: Image.new("RGB", (MIN_IMAGE_SIDE - 1, 200)).save(p, format="PNG"), "too small"),
    (lambda p: Image.new("F", (80, 80)).save(p, format="TIFF"), "unsupported image mode"),
])
def test_bad_images_name_file_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert str(path) in str(info.value) and reason in str(info.value)
