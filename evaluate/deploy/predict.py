"""``predict``: score new images with a trained checkpoint, one line per file.

Each image goes through the same 21-crop pyramid and frozen CLIP as ``extract`` (the backbone
must match the checkpoint's fingerprint; by default it is the one the checkpoint records,
``backbone_options_for``), then through the checkpoint's head. The decision uses the category's
threshold (``threshold_for``: F1-max of the final score on the run's training images of that
category). An unreadable file gets its own error line; the other files are still scored.

The same forward pass gives the crops' patch tokens (``cache.tokens``), which make the image's
anomaly map (``token_map_scores``: the checkpoint's pixel head, or zero-shot text when it has none),
written at the image's resolution as ``<name>_map.npy`` (float32, in [0, 1]) and blended over the
image as ``<name>_overlay.png``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raml.cache.files import atomic_write, make_dirs
from raml.errors import OptionError, UserError, working_on
from raml.extract.datasets import is_image
from raml.extract.prompts import encode_prompts
from raml.extract.pyramid import BadImageError, load_rgb, pyramid_crops
from raml.train.thresholds import threshold_for

PREDICTIONS_CSV = "predictions.csv"


@dataclass
class Prediction:
    path: Path
    final: float | None = None
    visual: float | None = None
    text: float | None = None
    map_max: float | None = None  # the anomaly map's maximum (its largest token score)
    anomalous: bool | None = None
    map: Path | None = None  # <name>_map.npy
    overlay: Path | None = None  # <name>_overlay.png
    error: str | None = None


def collect_files(inputs) -> list[Path]:
    """Files given directly (each must be an image), and the image files of given folders (sorted, not
    recursive; other files in a folder are ignored)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if is_image(p))
        else:
            files.append(item)
    if not files:
        raise FileNotFoundError(f"no files to score in {', '.join(map(str, inputs))}")
    return files


def _recorded_model(fingerprint: dict, source: dict) -> str:
    """The ``--model`` that recreates the checkpoint's backbone: the recorded one, an open_clip
    name, or a model config shipped in ``extract/model_configs``."""
    import open_clip

    from raml.extract.identity import TINY_TEST_CONFIG

    name, recorded = fingerprint.get("backbone"), source.get("model")
    if recorded and (Path(recorded).is_file() or recorded in open_clip.list_models()):
        return recorded
    if name in open_clip.list_models():
        return name
    shipped = TINY_TEST_CONFIG.with_name(f"{name}.json")
    if shipped.is_file():
        return str(shipped)
    where = f" (recorded at {recorded}, which is not there any more)" if recorded else ""
    raise UserError(
        f"the checkpoint's backbone {name!r} is a model config JSON{where}, not an open_clip model "
        f"name; pass --model PATH to {name}.json"
    )


def backbone_options_for(
    fingerprint: dict,
    model: str | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    random_weights: bool | None = None,
) -> dict:
    """The backbone options (``model``, ``pretrained``, ``weights``, ``random_weights``) that
    encode images for a checkpoint whose cache fingerprint is ``fingerprint``.

    An option left out (None) is the checkpoint's: its model, its pretrained tag, its weights file
    (found at the path the cache recorded, ``backbone_source``), or random weights. An option
    given must agree with the checkpoint; this is checked before CLIP is loaded, except a weights
    file's content, which ``check_backbone`` compares (sha256) once it is loaded. Raises
    ``UserError`` naming what differs, or which file (name and sha256) to pass with ``--weights``
    when the recorded one has moved.
    """
    from raml.extract.model_config import model_name

    source = fingerprint.get("backbone_source") or {}
    recorded_weights, recorded_random = fingerprint.get("weights"), bool(fingerprint.get("random_weights"))
    is_file = str(recorded_weights).startswith("sha256:")
    differ = []
    if random_weights is not None and bool(random_weights) != recorded_random:
        differ.append("--random-weights")
    if model is not None and model_name(model) != fingerprint.get("backbone"):
        differ.append("--model")
    if pretrained is not None and (recorded_random or is_file or pretrained != recorded_weights):
        differ.append("--pretrained")
    if weights is not None and (recorded_random or not is_file):
        differ.append("--weights")
    if differ:
        trained = f"--model {fingerprint.get('backbone')}" + (
            " --random-weights"
            if recorded_random
            else f" --weights FILE (sha256 {recorded_weights[7:]})"
            if is_file
            else f" --pretrained {recorded_weights}"
        )
        raise OptionError(
            differ[0],
            f"the checkpoint was trained on features of {trained}; the options given "
            f"differ in {', '.join(differ)}. Leave them out to use the checkpoint's backbone, "
            "or pass the ones it was trained with.",
        )
    options = {
        "model": model or _recorded_model(fingerprint, source),
        "pretrained": None,
        "weights": None,
        "random_weights": recorded_random,
    }
    if recorded_random:
        return options
    if not is_file:
        return {**options, "pretrained": recorded_weights}
    recorded_file = source.get("weights_file")
    if weights is None and not (recorded_file and Path(recorded_file).is_file()):
        name = f"{Path(recorded_file).name} " if recorded_file else ""
        where = f"; it was at {recorded_file}, which is not there any more" if recorded_file else ""
        raise UserError(
            f"the checkpoint's CLIP weights are the file {name}with sha256 {recorded_weights[7:]}{where}. "
            "Pass --weights PATH to that file (its sha256 is checked)."
        )
    return {**options, "weights": weights or recorded_file}


def backbone_fingerprint(backbone) -> dict:
    """The fingerprint (``cache.fingerprint``) of features encoded now by ``backbone``."""
    from raml.cache import fingerprint
    from raml.extract.identity import identity_of

    return fingerprint(**identity_of(backbone).fingerprint_fields(), code_version=None, dataset=None, prompts=None)


def check_backbone(checkpoint, backbone) -> None:
    """The image features must come from the backbone the head was trained on (same weights too).

    Only the precision may differ: an int8 encoder may feed a head trained on fp32 features (and
    the reverse), because the int8 engine is checked against fp32 on the user's own images
    (extract/int8_engine.py) before its scores are trusted.
    """
    from raml.cache import mismatched_fields

    mine = backbone_fingerprint(backbone)
    bad = [key for key in mismatched_fields(checkpoint.fingerprint, mine) if key != "precision"]
    if bad:
        details = "; ".join(f"{k}: checkpoint {checkpoint.fingerprint.get(k)!r}, given {mine.get(k)!r}" for k in bad)
        raise UserError(
            f"the backbone options do not match the checkpoint ({details}); leave --model/--pretrained/"
            "--weights/--random-weights out to use the checkpoint's, or pass the ones it was trained with "
            "(for --weights: the file with the checkpoint's sha256)"
        )


def feature_table(features: np.ndarray, categories, text: dict, backbone, sizes):
    """An in-memory ``FeatureTable`` of freshly encoded features [N, 21, D] of N images (their
    ``categories`` and (height, width) ``sizes``), stored in float16 like a cache, for ``score_rows``."""
    from raml.cache import FeatureTable

    n = len(features)
    sizes = np.asarray(sizes, np.int32).reshape(n, 2)
    return FeatureTable(
        features=features.astype(np.float16),
        label=np.zeros(n, np.int8),
        category=np.asarray(categories, dtype=str),
        defect_type=np.full(n, ""),
        relpath=np.array([f"image{i}" for i in range(n)]),
        split=np.full(n, "test"),
        mask_relpath=np.full(n, ""),
        height=sizes[:, 0],
        width=sizes[:, 1],
        text=text,
        meta=backbone_fingerprint(backbone),
        engines=[],
        skipped=[],
        cache_dir=Path("."),
        has_tokens=np.zeros(n, bool),
        token_defect=np.zeros((n, 0), np.float16),
        shard_file=np.full(n, -1),
        shard_row=np.full(n, -1),
        shards=[],
    )


def map_kind(checkpoint) -> str:
    """What ``token_map_scores`` scores the tokens with, in words."""
    from raml.evaluate.localisation import PIXEL_HEAD_MAP, ZERO_SHOT_MAP

    return PIXEL_HEAD_MAP if checkpoint.model.pixel is not None else ZERO_SHOT_MAP + " (the run has no pixel head)"


def token_map_scores(checkpoint, tokens: np.ndarray, text: dict, category: str) -> np.ndarray:
    """[n, T] scores of the images' patch tokens ([n, T, D]), the values of their maps: the checkpoint's
    pixel head, or zero-shot text with ``text`` (the category's prompt embeddings) when it has none. The
    tokens are rounded to float16 first, as the cache stores them (the head was trained on those)."""
    from raml.evaluate.localisation import zero_shot_token_scores
    from raml.train.infer import pixel_scores, text_tokens

    stored = np.asarray(tokens).astype(np.float16)
    if checkpoint.model.pixel is not None:
        return pixel_scores(checkpoint.model, stored)
    return zero_shot_token_scores(stored, text_tokens({category: text}, [category]), np.zeros(len(stored), int))


def predict_files(
    inputs,
    checkpoint,
    category: str,
    out_dir,
    backbone,
    *,
    visual_weight=None,
    text_weight=None,
    heatmaps: bool = True,
    progress: bool = True,
    threshold: float | None = None,
) -> list[Prediction]:
    """Score every file with ``checkpoint`` (a loaded ``train.checkpoint.Checkpoint``); write
    predictions.csv and (``heatmaps``) each scored image's anomaly map and overlay. The decision
    is at ``threshold``, by default the checkpoint's (``threshold_for``)."""
    from tqdm import tqdm

    from raml.cache import N_CROPS
    from raml.cache.tokens import TOKEN_CROPS, map_at, token_grid, token_setting
    from raml.evaluate.overlay import overlay_image
    from raml.train.checkpoint import check_tokens
    from raml.train.infer import score_rows, score_weights

    check_backbone(checkpoint, backbone)
    check_tokens(checkpoint, token_setting(backbone.patch_grid, backbone.embed_dim), f"{backbone.name}")
    threshold = threshold_for(checkpoint, category) if threshold is None else threshold
    out_dir = Path(out_dir)
    make_dirs(out_dir)
    text = encode_prompts(backbone, category)
    weights = score_weights(checkpoint, visual_weight, text_weight)
    predictions = []
    for path in tqdm(collect_files(inputs), unit="img", desc="predict", disable=not progress):
        prediction = Prediction(path)
        predictions.append(prediction)
        if not is_image(path):
            prediction.error = f"{path}: not an image file (expected one of .png .jpg .jpeg .bmp .tif .tiff .webp)"
            continue
        try:
            image = load_rgb(path)
        except BadImageError as err:
            prediction.error = str(err)
            continue
        with working_on(f"image {path}"):
            features, tokens = backbone.encode_crops_and_tokens(pyramid_crops(image, backbone.input_size))
        table = feature_table(
            features.reshape(1, -1, backbone.embed_dim),
            [category],
            {category: text},
            backbone,
            [(image.height, image.width)],
        )
        scores = score_rows(checkpoint.model, table, **weights)  # check_backbone above stands for check_cache
        prediction.final, prediction.visual, prediction.text = (
            float(scores[k][0]) for k in ("final", "visual", "text")
        )
        prediction.anomalous = prediction.final >= threshold
        tile_tokens = tokens.reshape(N_CROPS, -1, backbone.embed_dim)[TOKEN_CROPS].reshape(1, -1, backbone.embed_dim)
        token_scores = token_map_scores(checkpoint, tile_tokens, text, category)[0]
        prediction.map_max = float(token_scores.max())
        if not heatmaps:
            continue
        anomaly_map = map_at(token_grid(token_scores, tokens.shape[1]), image.height, image.width)
        prediction.map = _unused(out_dir / f"{path.stem}_map.npy", {p.map for p in predictions})
        prediction.overlay = prediction.map.with_name(prediction.map.name[: -len("_map.npy")] + "_overlay.png")
        atomic_write(prediction.map, lambda tmp, grid=anomaly_map: _save_array(tmp, grid.astype(np.float32)))
        overlay = overlay_image(image, anomaly_map)
        atomic_write(prediction.overlay, lambda tmp, picture=overlay: picture.save(tmp, format="PNG"))
    _write_csv(out_dir / PREDICTIONS_CSV, predictions, category, threshold, backbone.random_weights)
    return predictions


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to the temporary file's name
        np.save(handle, array)


def _unused(path: Path, taken: set) -> Path:
    """``path``, or ``name_2.png``, ``name_3.png``... when two inputs share a file name."""
    candidate, number = path, 1
    while candidate in taken:
        number += 1
        candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
    return candidate


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _write_csv(
    path: Path, predictions: list[Prediction], category: str, threshold: float, random_weights: bool
) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "file",
                    "category",
                    "final",
                    "visual",
                    "text",
                    "map_max",
                    "threshold",
                    "decision",
                    "map",
                    "overlay",
                    "error",
                    "random_weights",
                ]
            )
            for p in predictions:
                decision = "" if p.anomalous is None else ("anomalous" if p.anomalous else "normal")
                writer.writerow(
                    [
                        p.path,
                        category,
                        _number(p.final),
                        _number(p.visual),
                        _number(p.text),
                        _number(p.map_max),
                        f"{threshold:.6f}",
                        decision,
                        p.map or "",
                        p.overlay or "",
                        p.error or "",
                        int(random_weights),
                    ]
                )

    atomic_write(path, write)


def prediction_table(predictions: list[Prediction], threshold: float, source: str) -> str:
    """The table ``predict`` prints: file, score, decision at ``threshold`` (``source`` says where it
    comes from), errors on their own lines."""
    width = max(len(str(p.path)) for p in predictions)
    lines = [f"{'file':<{width}}  {'score':>7}  decision (threshold {threshold:.3f}: {source})"]
    for p in predictions:
        if p.error:
            lines.append(f"{str(p.path):<{width}}  {'-':>7}  ERROR: {p.error}")
        else:
            lines.append(f"{str(p.path):<{width}}  {p.final:7.3f}  {'ANOMALOUS' if p.anomalous else 'normal'}")
    return "\n".join(lines)
