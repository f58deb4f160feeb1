"""The fidelity gate of an engine below fp32 (int8, bf16) where a checkpoint is given: ``predict``
and ``export``.

Besides the per-crop cosine to fp32 (extract/fidelity.py), these checks score the sample's images
with the checkpoint's head twice, from fp32 and from the engine's features, and compare the two
rankings (Spearman of s_final, with the checkpoint's score weights): the ranking is what a user
acts on. Below the limits they stop and tell the user to use fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raml.errors import UserError
from raml.evaluate.deploy.predict import check_backbone, feature_table
from raml.extract.engines import FIDELITY_SAMPLE
from raml.extract.fidelity import (
    FIDELITY_RECORD,
    Fidelity,
    image_crops,
    measure_fidelity,
    read_records,
    require_fidelity,
    say,
    write_record,
)
from raml.extract.identity import file_sha256
from raml.extract.plan import evenly_spaced
from raml.extract.prompts import encode_prompts
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
    """predict's check, on first use of this encoder with this checkpoint and category: encode up
    to ``sample`` of the given images (spread over the list) both ways and stop below the limits.

    A check on a full sample is recorded in the user's cache (``fidelity.json`` in the directory of
    its ONNX export, keyed by the encoder's ``fidelity_key``, the checkpoint's sha256 and the
    category), and later runs skip it; a check on fewer images is not recorded, so that a larger
    run checks again.
    Returns the figures, or ``None`` when the check was already recorded or no image could be read
    (predict then reports each file's error).
    """
    check_backbone(checkpoint, backbone)  # a checkpoint of another backbone fails here, not after the check
    from raml.extract.onnx_engine import export_dir

    record_path = export_dir(backbone) / FIDELITY_RECORD
    key = f"{backbone.fidelity_key}:{file_sha256(checkpoint.path)}:{category}"
    recorded = read_records(record_path).get(key)
    if recorded is not None:
        say(
            f"{backbone.engine} fidelity for this checkpoint and {category!r}: checked on {recorded['checked']} "
            f"({record_path})"
        )
        return None
    crops, _ = image_crops(evenly_spaced(files, sample), backbone)
    if not crops:
        return None
    text = {category: encode_prompts(backbone, category)}
    fidelity = measure_fidelity(backbone, crops, s_final_scorer(checkpoint, [category] * len(crops), text, backbone))
    advice = "use an fp32 engine (--engine onnx or torch) instead"
    require_fidelity(fidelity, backbone.engine, f"{len(crops)} of the images given", advice)
    if len(crops) >= sample:
        from raml.cache.files import make_dirs

        make_dirs(record_path.parent)
        write_record(record_path, key, fidelity, f"predict, {len(files)} files")
        say(f"{backbone.engine} fidelity on {len(crops)} of your images: {fidelity.summary()}")
    else:
        say(
            f"{backbone.engine} fidelity on {len(crops)} of your images: {fidelity.summary()}; not recorded "
            f"(fewer than {sample} images): the next run checks again"
        )
    return fidelity


def check_for_export(
    backbone, dataset: str, root, checkpoint, categories: list, text: dict, sample: int = FIDELITY_SAMPLE
) -> Fidelity:
    """export's check: ``sample`` images of ``dataset`` (those of ``categories``, spread over them),
    encoded both ways and scored with the checkpoint's head for each image's category; raises
    ``FidelityError`` below the limits, before anything is written."""
    from raml.extract.datasets import read_dataset

    root, records = read_dataset(dataset, root)
    records = [record for record in records if record.category in categories]
    if not records:
        raise UserError(
            f"--dataset {dataset} --root {root} has no images of {', '.join(categories)}: the fidelity "
            "check needs your own images of the exported categories"
        )
    chosen = evenly_spaced(records, sample)
    crops, kept = image_crops([root / record.relpath for record in chosen], backbone)
    if not crops:
        raise UserError(f"the fidelity check found no readable image among {len(chosen)} of {root}")
    fidelity = measure_fidelity(
        backbone, crops, s_final_scorer(checkpoint, [chosen[i].category for i in kept], text, backbone)
    )
    require_fidelity(
        fidelity, backbone.engine, f"{len(crops)} images of {root}", "export with --precision fp32 instead"
    )
    return fidelity
