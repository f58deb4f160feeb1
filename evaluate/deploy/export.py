"""``export``: a directory that scores images with ONNX Runtime alone — no torch, no RAML package.

    <out>/encoder.onnx     the CLIP image encoder: a copy of the verified export ``--engine onnx`` runs
                           (pixels [B, 3, S, S] float32 → L2-normalised embeddings [B, D] and pooled
                           patch tokens [B, p, p, D]), or with ``precision="int8"`` of the int8 model
                           ``--engine onnx-int8`` runs, once it has passed the fidelity check on a
                           sample of the user's images
          head.onnx        the trained head with the categories' text tokens baked in:
                           crops [B, 21, D] float32, category [B] int64 (index into deploy.json's
                           ``categories``) and tokens [B, T, D] (the 4x4 tiles' patch tokens) →
                           visual [B] (s_visual), text [B] (s_text) and pixel [B, T] (each token's
                           map value: the pixel head's, or zero-shot text without one)
          deploy.json      the rest of the contract: input size, mean/std, crop layout, categories,
                           each category's threshold (with its precision and recall on the
                           calibration images), score weights, and the backbone and checkpoint it
                           came from
          predict_onnx.py  the standalone scorer (a copy of ``evaluate/deploy/predict_onnx.py``)

s_final = visual_weight·visual + text_weight·text is left to the script, with deploy.json's
weights, so that the weights live in one place. Like the encoder, the head graph is compared with
the torch head (``train.infer``) before anything is written, and refused beyond
``PARITY_TOLERANCE``. deploy.json is written last: a directory without it is an incomplete export.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raml.cache import CROP_LAYOUT, N_CROPS
from raml.cache.files import (
    atomic_write,
    atomic_write_text,
    make_dirs,
    move_into_place,
    reporting_write_faults,
    write_fault,
)
from raml.cache.tokens import TILES, TOKEN_CROPS, token_setting
from raml.errors import UserError
from raml.evaluate.deploy.predict import check_backbone, map_kind, token_map_scores
from raml.evaluate.localisation import ZERO_SHOT_TEMPERATURE
from raml.extract.engines import FIDELITY_SAMPLE
from raml.extract.identity import file_sha256
from raml.extract.int8_engine import QUANTISATION, int8_backbone
from raml.extract.onnx_engine import PARITY_TOLERANCE, OnnxEngineError, onnx_image_encoder
from raml.extract.prompts import encode_prompts
from raml.extract.pyramid import MIN_IMAGE_SIDE
from raml.train.checkpoint import check_tokens
from raml.train.infer import CLIP_LOGIT_SCALE, score_weights, text_score, text_tokens, visual_score
from raml.train.thresholds import threshold_for, threshold_note

DEPLOY_FORMAT = 2  # 2: patch tokens in, anomaly map out
DEPLOY_JSON, ENCODER_FILE, HEAD_FILE, SCRIPT_FILE = "deploy.json", "encoder.onnx", "head.onnx", "predict_onnx.py"
OPENVINO_ENCODER_FILE, OPENVINO_WEIGHTS_FILE = "encoder.xml", "encoder.bin"  # --format openvino
OPENVINO_ENGINES = {"fp32": "openvino", "int8": "openvino-int8", "bf16": "openvino-bf16"}  # by --precision
SCRIPT_TEMPLATE = Path(__file__).with_name("predict_onnx.py")
HEAD_INPUTS, HEAD_OUTPUTS = ("crops", "category", "tokens"), ("visual", "text", "pixel")
HEAD_CHECK_IMAGES = 8  # random feature sets compared with the torch head before head.onnx is accepted
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this deployment was exported from a CLIP with random weights; "
    "every score it gives is meaningless. It exercises the deployment, nothing more."
)


class DeployedHead(torch.nn.Module):
    """The graph of head.onnx: 21 fresh crop embeddings, a category index and the 4x4 tiles' patch
    tokens → s_visual, s_text and each token's map value, exactly as ``predict`` scores them.

    s_text and the zero-shot map are restated here in torch because ``train.infer.text_score`` and
    ``evaluate.localisation.zero_shot_token_scores`` are numpy and cannot be traced;
    ``export_deployment`` compares all three outputs before writing, so they cannot drift apart.
    """

    def __init__(self, head: torch.nn.Module, text_bank: np.ndarray):
        super().__init__()
        self.head = head
        self.register_buffer("text_bank", torch.as_tensor(text_bank, dtype=torch.float32))  # [C, 2, D] unit tokens

    def forward(self, crops: torch.Tensor, category: torch.Tensor, tokens: torch.Tensor):
        # The cache stores features in float16 and predict scores them the same way (the head was
        # trained on float16-rounded features): round here too, or s_text differs by up to ~5e-4.
        crops, tokens = crops.half().float(), tokens.half().float()
        _, logits = self.head(crops, self.text_bank, category)
        cosines = torch.einsum("bd,bkd->bk", F.normalize(crops[:, 0], dim=-1), self.text_bank[category])
        if self.head.pixel is not None:
            pixel = torch.sigmoid(self.head.pixel(tokens)[1])
        else:
            token_cosines = torch.einsum("btd,bkd->btk", F.normalize(tokens, dim=-1), self.text_bank[category])
            pixel = torch.sigmoid((token_cosines[..., 1] - token_cosines[..., 0]) / ZERO_SHOT_TEMPERATURE)
        return torch.sigmoid(logits), torch.sigmoid(CLIP_LOGIT_SCALE * (cosines[:, 1] - cosines[:, 0])), pixel


def export_deployment(
    checkpoint,
    out_dir,
    backbone,
    *,
    categories=None,
    onnx_cache_root=None,
    log=print,
    precision: str = "fp32",
    sample_dataset=None,
    fidelity_sample: int = FIDELITY_SAMPLE,
    runtime: str = "onnx",
) -> dict:
    """Write ``out_dir``'s deployment for ``backbone`` (that of the checkpoint); returns deploy.json's content.

    ``checkpoint`` is a loaded ``train.checkpoint.Checkpoint``. ``categories`` (default: its own) are
    baked into head.onnx in this order. ``precision="int8"`` deploys the int8 encoder, checked first
    on ``fidelity_sample`` images of ``sample_dataset`` = (dataset kind, root), the user's own.
    ``runtime="openvino"`` deploys the encoder as OpenVINO IR (encoder.xml and .bin; ``precision``
    fp32, int8 or, on a CPU with bf16 arithmetic, bf16), run by OpenVINO in predict_onnx.py.
    Raises ``ValueError`` when the backbone is not the checkpoint's, ``OnnxEngineError`` when a
    graph does not match torch, ``Int8FidelityError`` when int8 is too far from fp32.
    """
    start = time.perf_counter()
    check_backbone(checkpoint, backbone)
    categories = list(dict.fromkeys(categories or checkpoint.categories))
    setting = token_setting(backbone.patch_grid, backbone.embed_dim)
    check_tokens(checkpoint, setting, backbone.name)
    thresholds = {category: threshold_for(checkpoint, category) for category in categories}
    untrained = [c for c in categories if c not in checkpoint.categories]
    if untrained:
        log(
            f"note: the checkpoint was trained on {', '.join(checkpoint.categories)}, not on {', '.join(untrained)}: "
            "scoring those is a transfer."
        )
    pooled = {category: note for category in categories if (note := threshold_note(checkpoint, category))}
    for note in pooled.values():
        log(f"note: {note}")
    text = {category: encode_prompts(backbone, category) for category in categories}
    encoder, encoder_facts = _verified_encoder(
        checkpoint, backbone, precision, runtime, categories, text, onnx_cache_root, sample_dataset, fidelity_sample
    )
    bank = text_tokens(text, categories)
    weights = score_weights(checkpoint, None, None)

    out = Path(out_dir)
    make_dirs(out)
    head_tmp = out / f".{HEAD_FILE}.{os.getpid()}.tmp"
    try:
        head_diff = _export_verified_head(
            DeployedHead(checkpoint.model, bank).eval(), checkpoint, text, categories, setting["tokens"], head_tmp
        )
        (out / DEPLOY_JSON).unlink(missing_ok=True)  # until the new one is written, the directory reads as incomplete
        encoder_file = OPENVINO_ENCODER_FILE if runtime == "openvino" else ENCODER_FILE
        for stale in {ENCODER_FILE, OPENVINO_ENCODER_FILE, OPENVINO_WEIGHTS_FILE} - {encoder_file}:
            (out / stale).unlink(missing_ok=True)  # another runtime's encoder of an earlier export
        if runtime == "openvino":
            from raml.extract.openvino_engine import save_deployment_encoder

            encoder_facts.update(save_deployment_encoder(encoder, out / encoder_file))
        else:
            _replace_with_copy(encoder.path, out / encoder_file)
        with reporting_write_faults(out / HEAD_FILE):
            move_into_place(head_tmp, out / HEAD_FILE)
    finally:
        head_tmp.unlink(missing_ok=True)
    _replace_with_copy(SCRIPT_TEMPLATE, out / SCRIPT_FILE)
    deploy = {
        "format": DEPLOY_FORMAT,
        "precision": precision,
        "random_weights": bool(backbone.random_weights),
        **({"warning": RANDOM_WEIGHTS_WARNING} if backbone.random_weights else {}),
        "backbone": backbone.name,
        "weights": backbone.weights,
        "input_size": backbone.input_size,
        "embed_dim": backbone.embed_dim,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "resize": "bicubic",
        "crop_layout": [list(grid) for grid in CROP_LAYOUT],
        "min_image_side": MIN_IMAGE_SIDE,
        "crop_order": "whole image, then each grid row-major; tile edges at floor(k*side/n), cut from the "
        "original image; every tile resized to input_size x input_size",
        "categories": categories,
        "thresholds": thresholds,
        "threshold_is": f"{checkpoint.thresholds['rule']}, per category, calibrated on {checkpoint.thresholds['set']}",
        "threshold_calibration": {
            category: pooled.get(category) or checkpoint.thresholds["categories"][category] for category in categories
        },
        "score_weights": {"visual": float(weights["visual_weight"]), "text": float(weights["text_weight"])},
        "encoder": {
            "file": encoder_file,
            "input": "pixels",
            "output": "embedding",
            **_file_facts(out / encoder_file),
            **encoder_facts,
        },
        "head": {
            "file": HEAD_FILE,
            "inputs": list(HEAD_INPUTS),
            "outputs": list(HEAD_OUTPUTS),
            **_file_facts(out / HEAD_FILE),
            "max_abs_diff_vs_torch": head_diff,
        },
        "map": {
            "kind": map_kind(checkpoint),
            "token_crops": [TOKEN_CROPS.start, TOKEN_CROPS.stop],
            "tiles": TILES,
            "per_tile": setting["per_tile"],
            "geometry": "the tiles' tokens (tile-major, row-major within a tile) form a grid of tiles x per_tile "
            "cells a side; each tile of w px holds per_tile cells of w/per_tile px; the map at a pixel "
            "centre interpolates linearly between the two nearest cell centres along each axis "
            "(the outermost cell beyond the outermost centres)",
        },
        "trained_categories": list(checkpoint.categories),
        "checkpoint": str(checkpoint.path.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint.path),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "export_seconds": round(time.perf_counter() - start, 1),
        "versions": encoder.meta.get("versions", {}),
    }
    atomic_write_text(out / DEPLOY_JSON, json.dumps(deploy, indent=2))
    return deploy


def _verified_encoder(
    checkpoint,
    backbone,
    precision: str,
    runtime: str,
    categories: list,
    text: dict,
    onnx_cache_root,
    sample_dataset,
    fidelity_sample: int,
):
    """The encoder to deploy (ONNX Runtime's, or with ``runtime="openvino"`` the OpenVINO backbone)
    and what deploy.json says about it: the fp32 export and its difference to torch, or a reduced
    precision's settings and its fidelity on the user's images."""
    if runtime == "openvino":
        from raml.extract.openvino_engine import WEIGHT_COMPRESSION, openvino_backbone

        if precision not in OPENVINO_ENGINES:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(OPENVINO_ENGINES)}")
        engine = OPENVINO_ENGINES[precision]
        ov_backbone = openvino_backbone(backbone, engine, cache_root=onnx_cache_root)
        encoder = ov_backbone.image_encoder
        if precision == "fp32":
            return encoder, {"precision": "fp32", "max_abs_diff_vs_torch": encoder.meta["max_abs_diff"]}
        fidelity = _checked(ov_backbone, precision, checkpoint, categories, text, sample_dataset, fidelity_sample)
        settings = {"compression": WEIGHT_COMPRESSION} if precision == "int8" else {}
        return encoder, {"precision": ov_backbone.precision, **settings, "fidelity": fidelity.to_dict()}
    if precision == "fp32":
        encoder = onnx_image_encoder(backbone, cache_root=onnx_cache_root)
        return encoder, {"precision": "fp32", "max_abs_diff_vs_torch": encoder.meta["max_abs_diff"]}
    if precision != "int8":
        raise UserError(f"--precision {precision}: the ONNX encoder is fp32 or int8 (bf16 with --format openvino)")
    int8 = int8_backbone(backbone, cache_root=onnx_cache_root)
    fidelity = _checked(int8, precision, checkpoint, categories, text, sample_dataset, fidelity_sample)
    encoder = int8.image_encoder
    return encoder, {
        "precision": "int8",
        "quantisation": QUANTISATION,
        "quantised_from_sha256": encoder.meta["quantised_from_sha256"],
        "fidelity": fidelity.to_dict(),
    }


def _checked(reduced, precision: str, checkpoint, categories, text, sample_dataset, fidelity_sample: int):
    """The fidelity of the ``reduced`` backbone on ``sample_dataset``'s images; refused below the limits."""
    if sample_dataset is None:
        raise UserError(
            f"export --precision {precision} first checks the {precision} encoder against fp32 on your own images: "
            "pass --dataset (and --root) with images of the exported categories"
        )
    from raml.evaluate.deploy.int8_check import check_for_export

    return check_for_export(reduced, *sample_dataset, checkpoint, categories, text, fidelity_sample)


def _export_verified_head(
    module: DeployedHead, checkpoint, text: dict, categories: list, token_count: int, path: Path
) -> float:
    """Export ``module`` to ``path``, then check that ONNX Runtime's scores match the torch head's
    (``train.infer``) on random features; returns the max abs difference."""
    import onnxruntime

    batch = torch.export.Dim("batch")
    dim = module.text_bank.shape[-1]
    example = (
        torch.randn(2, N_CROPS, dim),
        torch.zeros(2, dtype=torch.long),  # 2: size-1 dims get specialised
        torch.randn(2, token_count, dim),
    )
    try:
        with warnings.catch_warnings():
            # The inputs share the batch axis; torch then warns that it keeps one of its names.
            warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=list(HEAD_INPUTS),
                output_names=list(HEAD_OUTPUTS),
                external_data=False,
                dynamo=True,
                verbose=False,
                dynamic_shapes={"crops": {0: batch}, "category": {0: batch}, "tokens": {0: batch}},
            )
    except Exception as err:  # the exporter raises many types: a full disk, or "this head does not export"
        raise write_fault(err, path) or OnnxEngineError(
            f"torch.onnx could not export the head of {checkpoint.path}: {err}"
        ) from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = _head_difference(session, checkpoint, module.text_bank.numpy(), text, categories, token_count)
    if not diff <= PARITY_TOLERANCE:  # written so that NaN fails too
        raise OnnxEngineError(
            f"the ONNX head of {checkpoint.path} does not match the torch head: max abs "
            f"difference {diff:.2e} on {HEAD_CHECK_IMAGES} random images, tolerance "
            f"{PARITY_TOLERANCE:g}. Nothing in {path.parent} was changed."
        )
    return diff


def _head_difference(session, checkpoint, bank: np.ndarray, text: dict, categories: list, token_count: int) -> float:
    """Max abs difference of s_visual, s_text and the map values between ``session`` and ``predict``'s
    own scoring (``train.infer``, ``token_map_scores``) on random unit features and tokens, given to
    the graph in float32 and rounded to float16 by ``predict``."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((HEAD_CHECK_IMAGES, N_CROPS, bank.shape[-1])).astype(np.float32)
    tokens = rng.standard_normal((HEAD_CHECK_IMAGES, token_count, bank.shape[-1])).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    index = np.arange(HEAD_CHECK_IMAGES) % len(categories)
    visual, text_scores, pixel = session.run(
        list(HEAD_OUTPUTS), {"crops": features, "category": index.astype(np.int64), "tokens": tokens}
    )
    stored = features.astype(np.float16)
    want_visual = visual_score(checkpoint.model, stored, bank, index)
    want_text = text_score(stored[:, 0], text, np.asarray(categories)[index])
    want_pixel = np.concatenate(
        [
            token_map_scores(checkpoint, tokens[i : i + 1], text[categories[k]], categories[k])
            for i, k in enumerate(index)
        ]
    )
    return float(
        max(np.abs(visual - want_visual).max(), np.abs(text_scores - want_text).max(), np.abs(pixel - want_pixel).max())
    )


def _replace_with_copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def _file_facts(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
