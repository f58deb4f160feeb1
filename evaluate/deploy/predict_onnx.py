"""Score images with a RAML deployment (``raml export``), using only onnxruntime,
numpy and pillow — no torch, no RAML package.

    python predict_onnx.py part.png [more.png ...] [--category bottle] [--maps DIR]

Prints file, score (s_final) and the decision at the category's threshold (the exported one, or
the one ``raml calibrate`` set from good images; the header says which), one line per file; a
file that cannot be scored gets an ERROR line and the exit status is 1. With ``--maps DIR``, each
image's anomaly map at its resolution goes to ``DIR/<name>_map.npy`` (float32). The deployment
(deploy.json, encoder.onnx or OpenVINO's encoder.xml/.bin, head.onnx) is read from this script's directory.

The one deliberate copy of RAML code: ``load_rgb`` and ``pyramid_pixels`` restate
extract/pyramid.py, ``token_grid`` and ``anomaly_map`` restate cache/tokens.py's ``token_grid`` and ``map_at``, because a deployment
cannot import the package. tests/test_export.py checks that they give identical pixels and maps
and that this script reproduces ``predict``'s scores and maps.
(``export`` copies this file unchanged from evaluate/deploy/predict_onnx.py in the RAML repository;
``raml serve`` and ``raml calibrate`` import its functions from there, so that a deployment is
scored by one piece of code wherever it runs.)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
DEPLOY_FORMAT = 2  # the deploy.json this script reads (export.DEPLOY_FORMAT)
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class TooManyPixelsError(ValueError):
    """An image larger than the caller allows, found from its header before it is decoded."""


def load_rgb(source, min_side, *, max_pixels=None, formats=None):
    """Decode as 8-bit RGB, upright (EXIF orientation applied); 16-bit grey is scaled to 8 bits
    (PIL's own conversion clips at 255). ``source`` is a path or a binary file object; ``formats``
    (PIL's names, e.g. ("PNG", "JPEG")) limits the decoders tried; an image of more than
    ``max_pixels`` pixels is refused from its header, before any pixel is decoded."""
    with Image.open(source, formats=formats) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise TooManyPixelsError(
                f"{image.width}x{image.height} px = {image.width * image.height:,} pixels, more than the "
                f"{max_pixels:,} allowed"
            )
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in SIXTEEN_BIT_MODES:
            values = np.asarray(image, np.float64)
            if values.min() < 0 or values.max() > 65535:
                raise ValueError(f"unsupported mode {image.mode} with values outside 0..65535")
            rgb = Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L").convert("RGB")
        else:
            rgb = image.convert("RGB")
    if min(rgb.size) < min_side:
        raise ValueError(f"too small ({rgb.width}x{rgb.height} px); the finest grid needs {min_side} px a side")
    return rgb


def pyramid_pixels(image, size, mean, std, layout):
    """The crops [N, 3, size, size]: per grid (rows, cols), row-major tiles with edges at
    floor(k·side/n), cut from the original image, bicubic-resized to size x size, normalised."""
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(std, np.float32).reshape(3, 1, 1)
    width, height = image.size
    crops = []
    for rows, cols in layout:
        for r in range(rows):
            for c in range(cols):
                box = (c * width // cols, r * height // rows, (c + 1) * width // cols, (r + 1) * height // rows)
                tile = image.crop(box).resize((size, size), Image.BICUBIC)
                crops.append((np.asarray(tile, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std)
    return np.stack(crops)


def token_grid(scores, tiles, per_tile):
    """One image's token scores [tiles² · per_tile²] (tile-major, row-major within a tile) as the
    grid [tiles · per_tile, tiles · per_tile] they cover, row-major over the image."""
    return np.moveaxis(np.asarray(scores).reshape(tiles, tiles, per_tile, per_tile), 2, 1).reshape(tiles * per_tile, -1)


def anomaly_map(scores, height, width, tiles, per_tile):
    """The map [height, width] of one image's token scores [tiles² · per_tile²] (tile-major, row-major within a
    tile), at its pixel centres: along each axis, linear between the two nearest cell centres of a tile row
    (tile edges at floor(k·side/tiles), per_tile cells a tile), the outermost cell beyond the outermost centres."""
    grid = token_grid(scores, tiles, per_tile)

    def weights(size):
        edges = (np.arange(tiles + 1) * size // tiles).astype(np.float64)
        centres = np.arange(size) + 0.5
        tile = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, tiles - 1)
        cells = tiles * per_tile
        cell = np.clip(
            tile * per_tile + (centres - edges[tile]) * per_tile / (edges[tile + 1] - edges[tile]) - 0.5, 0, cells - 1
        )
        low = np.minimum(np.floor(cell).astype(int), cells - 2)
        matrix = np.zeros((size, cells))
        matrix[np.arange(size), low] = 1 - (cell - low)
        matrix[np.arange(size), low + 1] = cell - low
        return matrix

    return (weights(height) @ grid.astype(np.float64) @ weights(width).T).astype(np.float32)


def read_deployment(directory=HERE):
    """deploy.json of the deployment in ``directory``; raises ``ValueError`` saying what is wrong."""
    path = Path(directory) / "deploy.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: not a deployment, or an incomplete export; run raml export again")
    try:
        deploy = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err}); run raml export again") from err
    if not isinstance(deploy, dict) or deploy.get("format") != DEPLOY_FORMAT:
        found = deploy.get("format") if isinstance(deploy, dict) else None
        raise ValueError(
            f"{path}: deployment format {found!r}, this scorer reads {DEPLOY_FORMAT}; run raml export again"
        )
    return deploy


def open_graph(deploy, part, directory=HERE):
    """An ONNX Runtime session of ``part`` ("encoder" or "head"); ``ValueError`` when its file is not
    the one deploy.json describes."""
    path = Path(directory) / deploy[part]["file"]
    if not path.is_file() or path.stat().st_size != deploy[part]["bytes"]:
        raise ValueError(
            f"{path}: not the file {Path(directory) / 'deploy.json'} describes (missing or size differs); export again"
        )
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the optimiser's notes about the graph are harmless
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def threshold_for(deploy, category):
    """(threshold, where it comes from in words) for ``category``: the one ``raml calibrate`` set from
    good images when deploy.json records it, else the exported one."""
    threshold = float(deploy["thresholds"][category])
    calibrated = deploy.get("good_image_calibration", {}).get(category)
    if calibrated is not None and calibrated["threshold"] == threshold:
        return threshold, (
            f"calibrated on {calibrated['images']} good images for false alarms <= {calibrated['false_alarm_rate']:g} "
            f"({calibrated['false_alarms_on_them']:.2%} on them)"
        )
    if calibrated is not None:
        return threshold, "set by hand in deploy.json (not the one raml calibrate wrote)"
    note = deploy.get("threshold_calibration", {}).get(category)
    pooled = f"; {note}" if isinstance(note, str) else ""
    return threshold, f"exported: {deploy['threshold_is']}{pooled}"


def score_crops(encoder, head, deploy, crops, categories):
    """Score a batch: ``crops`` [B · 21, 3, S, S] (the images' ``pyramid_pixels``, one after the other),
    ``categories`` [B] (indices into deploy.json's categories) → (s_final [B] float64, each image's
    token map values [B, T]) from one encoder call and one head call."""
    embeddings, tokens = encoder.run(None, {"pixels": crops})
    count, first, last = len(categories), *deploy["map"]["token_crops"]
    embeddings = embeddings.reshape(count, -1, embeddings.shape[-1])
    tile_tokens = tokens.reshape(count, -1, *tokens.shape[1:])[:, first:last].reshape(count, -1, tokens.shape[-1])
    visual, text, pixel = head.run(
        None, {"crops": embeddings, "category": np.asarray(categories, np.int64), "tokens": tile_tokens}
    )
    weights = deploy["score_weights"]
    final = weights["visual"] * visual.astype(np.float64) + weights["text"] * text.astype(np.float64)
    return final, pixel


def open_encoder(deploy, directory=HERE):
    """The encoder, with ONNX Runtime's ``run(None, feeds)``: an ONNX Runtime session, or OpenVINO's
    compiled model for a deployment exported with ``--format openvino`` (encoder.xml and .bin, at the
    inference precision deploy.json names)."""
    if deploy["encoder"].get("format") != "openvino":
        return open_graph(deploy, "encoder", directory)
    import openvino

    path, facts = Path(directory) / deploy["encoder"]["file"], deploy["encoder"]
    for file, size in ((path, facts["bytes"]), (Path(directory) / facts["weights_file"], facts["weights_bytes"])):
        if not file.is_file() or file.stat().st_size != size:
            raise ValueError(
                f"{file}: not the file {Path(directory) / 'deploy.json'} describes (missing, or its size differs); "
                "export again"
            )
    hint = {"INFERENCE_PRECISION_HINT": facts["inference_precision"]}
    return OpenVinoEncoder(openvino.Core().compile_model(str(path), "CPU", hint))


class OpenVinoEncoder:
    """OpenVINO's compiled encoder behind ONNX Runtime's ``run(None, feeds)``."""

    def __init__(self, compiled):
        self.compiled = compiled

    def run(self, names, feeds):
        return [np.asarray(output) for output in self.compiled(feeds).values()]


def main(argv=None):
    try:
        deploy = read_deployment()
    except ValueError as err:
        sys.exit(str(err))
    categories = deploy["categories"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files to score")
    parser.add_argument(
        "--category",
        default=categories[0] if len(categories) == 1 else None,
        help=f"what the images show: one of {', '.join(categories)}",
    )
    parser.add_argument("--maps", default=None, help="directory for each image's anomaly map (NAME_map.npy)")
    args = parser.parse_args(argv)
    if args.category not in categories:
        given = "is needed:" if args.category is None else f"{args.category}: not exported to {HERE};"
        parser.error(f"--category {given} one of {', '.join(categories)}")
    if deploy["random_weights"]:
        print(f"warning: {deploy['warning']}", file=sys.stderr)
    try:
        encoder, head = open_encoder(deploy), open_graph(deploy, "head")
    except ValueError as err:
        sys.exit(str(err))
    category = [categories.index(args.category)]
    threshold, source = threshold_for(deploy, args.category)
    width = max(len(name) for name in args.images)
    print(f"{'file':<{width}}  {'score':>8}  decision (threshold {threshold:.6f}: {source})")
    failed, geometry = 0, deploy["map"]
    if args.maps:
        Path(args.maps).mkdir(parents=True, exist_ok=True)
    for name in args.images:
        try:
            image = load_rgb(name, deploy["min_image_side"])
            crops = pyramid_pixels(image, deploy["input_size"], deploy["mean"], deploy["std"], deploy["crop_layout"])
            final, pixel = score_crops(encoder, head, deploy, crops, category)
            if args.maps:
                np.save(
                    Path(args.maps) / f"{Path(name).stem}_map.npy",
                    anomaly_map(pixel[0], image.height, image.width, geometry["tiles"], geometry["per_tile"]),
                )
        except Exception as err:  # PIL and onnxruntime raise many types; each is one file's failure
            failed += 1
            print(f"{name:<{width}}  {'-':>8}  ERROR: {name}: {err}")
            continue
        score = float(final[0])
        print(f"{name:<{width}}  {score:8.6f}  {'ANOMALOUS' if score >= threshold else 'normal'}")
    if deploy["random_weights"]:
        print("RANDOM WEIGHTS: these scores are NOT MEANINGFUL.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
