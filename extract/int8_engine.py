"""The int8 image encoder for CPUs (``--engine onnx-int8``, ``export --precision int8``).

The quantised model is made once from the verified fp32 export (extract/onnx_engine.py) and kept
beside it, under the same lock::

    <export dir>/encoder-int8.onnx   the fp32 graph's contract (pixels → L2-normalised embedding)
                 encoder-int8.json   sidecar: the sha256 of the fp32 export it was made from, the
                                     quantisation settings, its own byte size and sha256

It is made again when the fp32 export changes (another sha256), when the settings change, or when
it no longer has the size and sha256 its sidecar records; every rebuild says why on stderr.

**Quantisation that holds on every x86 CPU.** ONNX Runtime's dynamic quantisation: activations
uint8 per tensor (range taken from each run), weights int8 per output channel in a **7-bit range**,
|w| ≤ 64 (``reduce_range``). Why 7 bits: on x86 CPUs without VNNI (AVX2 only, or AVX-512 without
VNNI) ONNX Runtime multiplies uint8 by int8 with ``vpmaddubsw``, which adds each pair of products
into a *saturating 16-bit* integer. With 8-bit weights a pair can reach 2 × 255 × 127 = 64,770 and
is clipped at 32,767: under QEMU's AVX2-only Haswell model, 8-bit weights gave a per-crop cosine to
fp32 of 0.990 (tiny test model) and 0.983 (ViT-B/16), against 0.9999 on a VNNI CPU, whose
``vpdpbusd`` adds in 32 bits. With |w| ≤ 64 a pair is at most 2 × 255 × 64 = 32,640: no sum can
saturate, and the fidelity is the same on every instruction set (ViT-B/16: 0.99971 emulated
AVX2-only, 0.99973 on AVX-512 VNNI). The features are not bit-identical across CPU types (the
float parts of the graph round differently, and dynamic quantisation passes that on), so resumed
caches and tests compare with tolerances. The price is half the weight levels (cosine 0.9997
instead of 0.9999); the speed is the same. ``check_pair_sums`` verifies the bound on every quantised
model before it is used. uint8 weights (also free of saturation) ran 1.8× slower on VNNI; static
(QDQ) calibration was measured earlier (README, "Faster CPU encoding"): no faster, further from
fp32, and dependent on its calibration images.

**One image per run.** Dynamic quantisation scales each activation tensor by the range of the whole
run, so a crop's features depend on the crops it shares a run with (ViT-B/16: up to 3e-3 between
runs of 1 and of 8 crops). The engine runs the 21 crops of one image together (the caller always
passes whole images): an image's features then depend on that image alone, and extract, predict
and a deployment's predict_onnx.py (which runs an image's 21 crops at once) agree.

**Fidelity on the user's images.** Its features are checked against fp32 on a sample of the
user's own images before they are used, and refused below the limits (extract/fidelity.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from raml.cache import N_CROPS
from raml.cache.files import make_dirs, write_fault
from raml.errors import UserError
from raml.extract.encoder import ClipBackbone
from raml.extract.engines import INT8_PRECISION
from raml.extract.onnx_engine import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxClipBackbone,
    OnnxEngineError,
    OnnxImageEncoder,
    export_dir,
    export_lock,
    file_problem,
    first_line,
    key_fields,
    locked_fp32_encoder,
    onnxruntime_module,
    open_session,
    publish_encoder,
    read_sidecar,
    say,
    session_options,
    sidecar_fields,
    torch_fields,
)

INT8_FORMAT = 2  # bump when the quantised graph's contract changes: older ones are then rebuilt
INT8_FILE, INT8_SIDECAR_FILE = "encoder-int8.onnx", "encoder-int8.json"
QUANTISATION = {
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "precision": INT8_PRECISION,
    "weights": "int8, per output channel, 7-bit range |w| <= 64 (reduce_range)",
    "activations": "uint8, per tensor, range taken from each run",
}
# uint8 × int8 pair sums must fit the signed 16-bit accumulator of vpmaddubsw (x86 without VNNI).
PAIR_SUM_LIMIT = 32767
MAX_WEIGHT = PAIR_SUM_LIMIT // (2 * 255)  # 64
BUILD_CHECK_CROPS = 2  # random crops run once through a new model: it must load and give finite output


def int8_backbone(
    backbone: ClipBackbone, *, cache_root: Path | None = None, threads: int | None = None
) -> OnnxClipBackbone:
    """``backbone`` with its image encoder replaced by the int8 one (made once, then reused).

    The verified fp32 encoder is kept as ``reference_encoder`` for the fidelity gate. CPU only:
    ONNX Runtime's integer kernels are CPU kernels, and a GPU is better served by ``--engine torch``.
    """
    if backbone.device.type != "cpu":
        raise UserError(
            f"--engine onnx-int8 runs on the CPU, not on --device {backbone.device}: pass --device cpu, "
            "or use --engine torch on the GPU"
        )
    directory = export_dir(backbone, cache_root)
    make_dirs(directory)
    with export_lock(directory):
        fp32 = locked_fp32_encoder(backbone, directory, threads)
        int8 = _locked_int8_encoder(backbone, fp32, directory, threads)
    say(int8.describe())
    return OnnxClipBackbone(
        **torch_fields(backbone),
        image_encoder=int8,
        reference_encoder=fp32,
        engine="onnx-int8",
        precision=INT8_PRECISION,
    )


def quantise(source: Path, target: Path) -> None:
    """Write the int8 model of the fp32 graph ``source`` to ``target`` (settings: ``QUANTISATION``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_quantiser():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    except Exception as err:  # the quantiser raises many types: a full disk, or "this graph does not quantise"
        raise write_fault(err, target) or OnnxEngineError(
            f"onnxruntime could not quantise {source} to int8: {first_line(err)}. Use --engine onnx."
        ) from err


def largest_int8_weight(path: Path) -> int:
    """The largest |w| over the int8 weight tensors of the ONNX model at ``path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return max(
        (
            int(np.abs(numpy_helper.to_array(tensor).astype(np.int32)).max())
            for tensor in model.graph.initializer
            if tensor.data_type == onnx.TensorProto.INT8
        ),
        default=0,
    )


def check_pair_sums(path: Path) -> None:
    """Refuse a quantised model whose uint8 × int8 pair sums could saturate a 16-bit accumulator
    (``MAX_WEIGHT``): its features would then depend on the CPU's instruction set."""
    largest = largest_int8_weight(path)
    if largest > MAX_WEIGHT:
        raise OnnxEngineError(
            f"the int8 model {path} has a weight of {largest} (> {MAX_WEIGHT}): 2 × 255 × {largest} "
            f"> {PAIR_SUM_LIMIT} saturates on CPUs without VNNI, so its features would depend on "
            "the CPU. Nothing was cached; use --engine onnx."
        )


def _int8_key(backbone: ClipBackbone, fp32: OnnxImageEncoder) -> dict:
    """The sidecar fields that must be equal for a quantised model to be reused."""
    return {
        **key_fields(backbone),
        "int8_format": INT8_FORMAT,
        "quantised_from_sha256": fp32.meta["sha256"],
        "quantisation": QUANTISATION,
    }


def _locked_int8_encoder(
    backbone: ClipBackbone, fp32: OnnxImageEncoder, directory: Path, threads: int | None
) -> OnnxImageEncoder:
    """The int8 encoder in ``directory`` (reused, or quantised again from ``fp32``); the caller holds the lock."""
    ort = onnxruntime_module()
    options = session_options(ort, threads)
    path, sidecar = directory / INT8_FILE, directory / INT8_SIDECAR_FILE
    if path.exists() or sidecar.exists():
        problem = file_problem(path, sidecar, _int8_key(backbone, fp32))
        if problem is None:
            try:
                return _int8_encoder(
                    open_session(ort, path, options, ["CPUExecutionProvider"]), path, read_sidecar(sidecar)
                )
            except OnnxEngineError as err:
                problem = str(err)
        say(f"rebuilding {path}: {problem}")
    return _quantise_checked(backbone, fp32, directory, ort, options)


def _quantise_checked(
    backbone: ClipBackbone, fp32: OnnxImageEncoder, directory: Path, ort, options
) -> OnnxImageEncoder:
    """Quantise into a temporary file; once it loads and gives finite embeddings, move it and its sidecar
    into place (the sidecar last, so that a half-written pair reads as a mismatch and is rebuilt)."""
    path, tmp = directory / INT8_FILE, directory / f".{INT8_FILE}.{os.getpid()}.tmp"
    start = time.perf_counter()
    try:
        quantise(fp32.path, tmp)
        check_pair_sums(tmp)
        seconds = time.perf_counter() - start
        session = open_session(ort, tmp, options, ["CPUExecutionProvider"])
        size = backbone.input_size
        crops = np.random.default_rng(0).standard_normal((BUILD_CHECK_CROPS, 3, size, size)).astype(np.float32)
        out = session.run([OUTPUT_NAME], {INPUT_NAME: crops})[0]
        if out.shape != (BUILD_CHECK_CROPS, backbone.embed_dim) or not np.isfinite(out).all():
            raise OnnxEngineError(
                f"the int8 model of {fp32.path} gives {out.shape} outputs"
                f"{'' if np.isfinite(out).all() else ' with NaN or inf'}: nothing was cached; "
                "use --engine onnx"
            )
        meta = {
            **sidecar_fields(_int8_key(backbone, fp32), backbone, tmp, ort),
            "quantise_seconds": round(seconds, 2),
            "quantised": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        publish_encoder(tmp, path, directory / INT8_SIDECAR_FILE, meta)
    finally:
        tmp.unlink(missing_ok=True)
    say(
        f"quantised {backbone.name} image encoder to int8 in {seconds:.1f} s ({meta['bytes'] / 1e6:.1f} MB); "
        "it is checked against fp32 on your own images before its features are used"
    )
    return _int8_encoder(session, path, meta)


def _int8_encoder(session, path: Path, meta: dict) -> OnnxImageEncoder:
    return OnnxImageEncoder(session, path, meta, session.get_providers()[0], cpu_crops_per_run=N_CROPS)


@contextlib.contextmanager
def _quiet_quantiser():
    """quantize_dynamic logs a WARNING on the root logger advising shape pre-processing, which was
    measured to change nothing here (README); keep it off the user's terminal."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
