"""The int8 engine's fidelity check where a checkpoint is given: ``predict`` and ``export``.

Besides the per-crop cosine of int8 to fp32 (extract/int8_engine.py), these checks score the
sample's images with the checkpoint's head twice, from fp32 and from int8 features, and compare
the two rankings (Spearman of s_final, with the checkpoint's score weights): the ranking is what
a user acts on. Below the limits they stop and tell the user to use fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raml.errors import UserError
from raml.evaluate.deploy.predict import check_backbone, feature_table
from raml.extract.identity import file_sha256
from raml.extract.int8_engine import (
    FIDELITY_RECORD,
    FIDELITY_SAMPLE,
    Fidelity,
    image_crops,
    measure_fidelity,
    read_records,
    require_fidelity,
    write_record,
)
from raml.extract.onnx_engine import say
from raml.extract.prompts import encode_prompts
from raml.extract.run import evenly_spaced
from raml.train.infer import score_rows, score_weights


def s_final_scorer(checkpoint, categories: list, text: dict, backbone):
    """A function from features [N, 21, D] of N images of ``categories`` to their s_final [N], as
    ``predict`` scores them (float16-rounded features, the checkpoint's score weights)."""
    weights = score_weights(checkpoint)
    sizes = np.zeros((len(categories), 2))  # image sizes do not enter s_final

    def score(features: np.ndarray) -> np.ndarray:
        return score_rows(checkpoint.model, feature_table(features, categories, text, backbone, sizes), **weights)[
            "final"
        ]

    return score


def check_for_predict(
    backbone, files: list[Path], checkpoint, category: str, sample: int = FIDELITY_SAMPLE
) -> Fidelity | None:
    """predict's check, on first use of this int8 model with this checkpoint and category: encode up
    to ``sample`` of the given images (spread over the list) both ways and stop below the limits.

    A check on a full sample is recorded beside the int8 model (``int8-fidelity.json`` in its
    export directory, keyed by the int8 model's and the checkpoint's sha256 and the category), and
    later runs skip it; a check on fewer images is not recorded, so that a larger run checks again.
    Returns the figures, or ``None`` when the check was already recorded or no image could be read
    (predict then reports each file's error).
    """
    check_backbone(checkpoint, backbone)  # a checkpoint of another backbone fails here, not after the check
    record_path = backbone.image_encoder.path.parent / FIDELITY_RECORD
    key = f"{backbone.image_encoder.meta['sha256']}:{file_sha256(checkpoint.path)}:{category}"
    recorded = read_records(record_path).get(key)
    if recorded is not None:
        say(f"int8 fidelity for this checkpoint and {category!r}: checked on {recorded['checked']} ({record_path})")
        return None
    crops, _ = image_crops(evenly_spaced(files, sample), backbone)
    if not crops:
        return None
    text = {category: encode_prompts(backbone, category)}
    fidelity = measure_fidelity(backbone, crops, s_final_scorer(checkpoint, [category] * len(crops), text, backbone))
    require_fidelity(fidelity, f"{len(crops)} of the images given", "use --engine onnx (fp32) instead")
    if len(crops) >= sample:
        write_record(record_path, key, fidelity, f"predict, {len(files)} files")
        say(f"int8 fidelity on {len(crops)} of your images: {fidelity.summary()}")
    else:
        say(
            f"int8 fidelity on {len(crops)} of your images: {fidelity.summary()}; not recorded (fewer than "
            f"{sample} images): the next run checks again"
        )
    return fidelity


def check_for_export(
    backbone, dataset: str, root, checkpoint, categories: list, text: dict, sample: int = FIDELITY_SAMPLE
) -> Fidelity:
    """export's check: ``sample`` images of ``dataset`` (those of ``categories``, spread over them),
    encoded both ways and scored with the checkpoint's head for each image's category; raises
    ``Int8FidelityError`` below the limits, before anything is written."""
    from raml.extract.datasets import read_dataset

    root, records = read_dataset(dataset, root)
    records = [record for record in records if record.category in categories]
    if not records:
        raise UserError(
            f"--dataset {dataset} --root {root} has no images of {', '.join(categories)}: the int8 "
            "check needs your own images of the exported categories"
        )
    chosen = evenly_spaced(records, sample)
    crops, kept = image_crops([root / record.relpath for record in chosen], backbone)
    if not crops:
        raise UserError(f"the int8 check found no readable image among {len(chosen)} of {root}")
    fidelity = measure_fidelity(
        backbone, crops, s_final_scorer(checkpoint, [chosen[i].category for i in kept], text, backbone)
    )
    require_fidelity(fidelity, f"{len(crops)} images of {root}", "export with --precision fp32 instead")
    return fidelity
