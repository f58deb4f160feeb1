"""``predict``: score new images with a trained checkpoint, one line per file.

Each image goes through the same 21-crop pyramid and frozen CLIP as ``extract`` (the backbone
must match the checkpoint's fingerprint), then through the checkpoint's head. The decision uses
the checkpoint's threshold (F1-max of the final score on its training images). An unreadable
file gets its own error line; the other files are still scored.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache import UserError
from extract.datasets import is_image
from extract.prompts import encode_prompts
from extract.pyramid import BadImageError, load_rgb, pyramid_crops


PREDICTIONS_CSV = "predictions.csv"


@dataclass
class Prediction:
    path: Path
    final: float | None = None
    visual: float | None = None
    text: float | None = None
    anomalous: bool | None = None
    heatmap: Path | None = None
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


def check_backbone_options(fingerprint: dict, model: str, random_weights: bool) -> None:
    """Before loading CLIP: the model name and weight source must be the checkpoint's."""
    from extract.encoder import model_name
    wanted = {"backbone": model_name(model), "random_weights": bool(random_weights)}
    bad = {k: v for k, v in wanted.items() if fingerprint.get(k) != v}
    if bad:
        trained = f"--model {fingerprint.get('backbone')}" + (" --random-weights" if fingerprint.get("random_weights")
                                                              else f" (weights {fingerprint.get('weights')})")
        raise UserError(f"the checkpoint was trained on features of {trained}; the options given differ in "
                         f"{', '.join(bad)}. Pass the backbone options it was trained with.")


def backbone_fingerprint(backbone) -> dict:
    """The fingerprint fields (``cache.store.FINGERPRINT_KEYS``) of features encoded now by ``backbone``."""
    from cache import CROP_LAYOUT
    return {"backbone": backbone.name, "weights": backbone.weights, "random_weights": backbone.random_weights,
            "input_size": backbone.input_size, "embed_dim": backbone.embed_dim,
            "crop_layout": [list(grid) for grid in CROP_LAYOUT]}


def check_backbone(checkpoint, backbone) -> None:
    """The image features must come from the backbone the head was trained on (same weights too)."""
    from cache import mismatched_fields
    mine = backbone_fingerprint(backbone)
    bad = mismatched_fields(checkpoint.fingerprint, mine)
    if bad:
        details = "; ".join(f"{k}: checkpoint {checkpoint.fingerprint.get(k)!r}, given {mine.get(k)!r}" for k in bad)
        raise UserError(f"the backbone options do not match the checkpoint ({details}); pass the --model/"
                         "--pretrained/--weights/--random-weights it was trained with")


def threshold_for(checkpoint, category: str) -> float:
    """The checkpoint's decision threshold (one number, or one per category)."""
    threshold = checkpoint.threshold
    if isinstance(threshold, dict):
        if category not in threshold:
            raise UserError(f"the checkpoint has thresholds for {', '.join(sorted(threshold))}, not {category!r}")
        return float(threshold[category])
    return float(threshold)


def _table_of(features: np.ndarray, category: str, text: dict, backbone, size: tuple[int, int]):
    """A one-image, in-memory ``FeatureTable`` of freshly encoded features, as ``score_table`` expects."""
    from cache import FeatureTable
    one = lambda value: np.array([value])  # noqa: E731  (every column has one row)
    return FeatureTable(features=features.astype(np.float16), label=np.zeros(1, np.int8), category=one(category),
                        defect_type=one(""), relpath=one("image"), split=one("test"), mask_relpath=one(""),
                        height=one(size[0]), width=one(size[1]), text={category: text},
                        meta=backbone_fingerprint(backbone), engines=[], skipped=[], cache_dir=Path("."))


def _save_heatmap(path: Path, image, anomaly_map: np.ndarray, prediction: Prediction, threshold: float,
                  random_weights: bool) -> None:
    """The image beside its 4x4 tile map, titled with the score and the decision."""
    from evaluate.plots import overlay, plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3.6))
    left.imshow(image)
    left.set_axis_off()
    overlay(right, image, anomaly_map, float(anomaly_map.min()), float(anomaly_map.max()))
    fig.colorbar(right.images[-1], ax=right, fraction=0.046, label="tile text score (range of this image)")
    warning = "\nRANDOM WEIGHTS — NOT MEANINGFUL" if random_weights else ""
    fig.suptitle(f"{prediction.path.name}: score {prediction.final:.3f} → "
                 f"{'ANOMALOUS' if prediction.anomalous else 'normal'} (threshold {threshold:.3f}){warning}",
                 fontsize=9, color="firebrick" if warning else "black")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def predict_files(inputs, checkpoint, category: str, out_dir, backbone, *, visual_weight=None,
                  text_weight=None, heatmaps: bool = True, progress: bool = True) -> list[Prediction]:
    """Score every file with ``checkpoint`` (a loaded ``train.checkpoint.Checkpoint``); write
    predictions.csv and (``heatmaps``) one heatmap PNG per scored image."""
    from tqdm import tqdm

    from evaluate.localisation import maps_from_crop_scores, tile_text_scores
    from train.infer import score_table, score_weights

    check_backbone(checkpoint, backbone)
    threshold = threshold_for(checkpoint, category)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        features = backbone.encode_crops(pyramid_crops(image, backbone.input_size)).reshape(1, -1, backbone.embed_dim)
        table = _table_of(features, category, text, backbone, (image.height, image.width))
        scores = score_table(checkpoint, table, **weights)
        prediction.final, prediction.visual, prediction.text = (float(scores[k][0]) for k in ("final", "visual", "text"))
        prediction.anomalous = prediction.final >= threshold
        if not heatmaps:
            continue
        prediction.heatmap = _unused(out_dir / f"{path.stem}_heatmap.png", {p.heatmap for p in predictions})
        _save_heatmap(prediction.heatmap, image, maps_from_crop_scores(tile_text_scores(table))[0], prediction,
                      threshold, backbone.random_weights)
    _write_csv(out_dir / PREDICTIONS_CSV, predictions, category, threshold, backbone.random_weights)
    return predictions


def _unused(path: Path, taken: set) -> Path:
    """``path``, or ``name_2.png``, ``name_3.png``... when two inputs share a file name."""
    candidate, number = path, 1
    while candidate in taken:
        number += 1
        candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
    return candidate


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _write_csv(path: Path, predictions: list[Prediction], category: str, threshold: float, random_weights: bool) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "category", "final", "visual", "text", "threshold", "decision", "heatmap", "error",
                         "random_weights"])
        for p in predictions:
            decision = "" if p.anomalous is None else ("anomalous" if p.anomalous else "normal")
            writer.writerow([p.path, category, _number(p.final), _number(p.visual), _number(p.text), f"{threshold:.6f}",
                             decision, p.heatmap or "", p.error or "", int(random_weights)])


def prediction_table(predictions: list[Prediction], threshold: float) -> str:
    """The table ``predict`` prints: file, score, decision (errors on their own lines)."""
    width = max(len(str(p.path)) for p in predictions)
    lines = [f"{'file':<{width}}  {'score':>7}  decision (threshold {threshold:.3f})"]
    for p in predictions:
        if p.error:
            lines.append(f"{str(p.path):<{width}}  {'-':>7}  ERROR: {p.error}")
        else:
            lines.append(f"{str(p.path):<{width}}  {p.final:7.3f}  {'ANOMALOUS' if p.anomalous else 'normal'}")
    return "\n".join(lines)
