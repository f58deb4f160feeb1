"""The OpenVINO engines for CPUs (``--engine openvino``, ``openvino-int8``, ``openvino-bf16``;
the optional extra ``raml[openvino]``).

OpenVINO is Intel's inference runtime, with its own kernels for each x86 instruction set (AVX2,
AVX-512, VNNI, AMX); anomalib exports to it for CPU deployment. All three engines run the same
verified ONNX export as ``--engine onnx`` (extract/onnx_engine.py), read by OpenVINO:

- ``openvino``: fp32, its output checked against the fp32 export (ONNX Runtime) on random crops
  each time it is opened, within ``PARITY_TOLERANCE`` (OpenVINO would otherwise run bf16 on a CPU
  that has it: the precision is pinned to f32);
- ``openvino-bf16``: the same graph with OpenVINO's inference precision bf16, on CPUs with bf16
  arithmetic (AVX512_BF16 or AMX) only;
- ``openvino-int8``: the weights compressed to int8 by NNCF (per output channel, symmetric;
  ``WEIGHT_COMPRESSION``), made once and kept beside the ONNX export under its lock::

      <export dir>/encoder-ov-int8.xml, .bin   the compressed graph (OpenVINO IR)
                   encoder-ov-int8.json        sidecar: the sha256 of the fp32 export it was made
                                               from, the settings, each file's size and sha256

  OpenVINO's CPU plugin then quantises the activations at run time where it has int8 kernels.

int8 and bf16 pass the fidelity gate (extract/fidelity.py) before their features are used.
Every crop run is one image's 21 crops (callers pass whole images), as in the int8 ONNX engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raml.cache import N_CROPS
from raml.cache.files import atomic_write_text, make_dirs, move_into_place, reporting_write_faults
from raml.errors import UserError
from raml.extract.encoder import ClipBackbone
from raml.extract.engines import PRECISIONS, engine_problem, say, usable_cores
from raml.extract.identity import file_sha256
from raml.extract.onnx_engine import (
    INPUT_NAME,
    LOAD_CHECK_CROPS,
    OUTPUT_NAME,
    PARITY_TOLERANCE,
    TOKENS_NAME,
    OnnxClipBackbone,
    OnnxEngineError,
    OnnxImageEncoder,
    export_dir,
    export_lock,
    first_line,
    key_fields,
    locked_fp32_encoder,
    read_sidecar,
    torch_fields,
)

OV_INT8_FORMAT = 1  # bump when the compressed graph's contract changes: older ones are then rebuilt
OV_INT8_FILE, OV_INT8_SIDECAR_FILE = "encoder-ov-int8.xml", "encoder-ov-int8.json"
WEIGHT_COMPRESSION = {
    "tool": "nncf.compress_weights",
    "mode": "INT8_SYM",
    "precision": PRECISIONS["openvino-int8"],
    "weights": "int8, per output channel, symmetric",
    "activations": "as OpenVINO's CPU plugin runs them (quantised at run time where it has int8 kernels)",
}
INFERENCE_PRECISION = {"openvino": "f32", "openvino-int8": "f32", "openvino-bf16": "bf16"}


@dataclass
class OpenVinoImageEncoder:
    """A compiled OpenVINO model of a backbone's image tower: the interface of ``OnnxImageEncoder``."""

    compiled: object  # openvino.CompiledModel
    path: Path  # the .onnx it read, or the .xml of the int8 graph
    meta: dict  # the sidecar of that file
    inference_precision: str  # "f32" or "bf16"
    threads: int

    def describe(self) -> str:
        return f"OpenVINO CPU, {self.inference_precision}, {self.threads} threads, {self.path}"

    def encode(self, pixels: np.ndarray, with_tokens: bool = False):
        """[B, 3, S, S] normalised pixels → [B, D] float32 L2-normalised embeddings (and ``with_tokens``
        the pooled patch tokens [B, p, p, D]), in runs of one image's crops."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        names = [OUTPUT_NAME, TOKENS_NAME] if with_tokens else [OUTPUT_NAME]
        request = self._request
        runs = []
        for first in range(0, len(pixels), N_CROPS):
            results = request.infer({INPUT_NAME: pixels[first : first + N_CROPS]})
            runs.append([np.array(results[self.compiled.output(name)]) for name in names])
        if not runs:
            return np.zeros((0, self.meta["embed_dim"]), np.float32)
        joined = [np.concatenate([run[k] for run in runs]) for k in range(len(names))]
        return tuple(joined) if with_tokens else joined[0]

    @property
    def _request(self):
        if not hasattr(self, "_infer_request"):
            self._infer_request = self.compiled.create_infer_request()
        return self._infer_request


def openvino_backbone(
    backbone: ClipBackbone, engine: str = "openvino", *, cache_root: Path | None = None, threads: int | None = None
) -> OnnxClipBackbone:
    """``backbone`` with its image tower run by OpenVINO as ``engine`` says (module docstring); the
    verified fp32 ONNX encoder is kept as the reference of int8 and bf16. Raises ``UserError`` where
    the engine cannot run here, ``OnnxEngineError`` where a graph does not hold its contract."""
    problem = engine_problem(engine, backbone.device.type)
    if problem:
        raise UserError(problem)
    directory = export_dir(backbone, cache_root)
    make_dirs(directory)
    with export_lock(directory):
        fp32 = locked_fp32_encoder(backbone, directory, threads)
        path, meta = (fp32.path, fp32.meta) if engine != "openvino-int8" else _locked_int8_graph(backbone, fp32)
    encoder = _compiled(path, meta, INFERENCE_PRECISION[engine], threads or usable_cores())
    _check_against(encoder, fp32, backbone, parity=engine == "openvino")
    say(f"{engine}: {encoder.describe()}")
    reduced = PRECISIONS[engine] != "fp32"
    return OnnxClipBackbone(
        **torch_fields(backbone),
        image_encoder=encoder,
        reference_encoder=fp32 if reduced else None,
        engine=engine,
        precision=PRECISIONS[engine],
    )


def openvino_module():
    try:
        import openvino
    except ImportError as err:
        raise OnnxEngineError(f"the OpenVINO engines need openvino ({err}): pip install 'raml[openvino]'") from err
    return openvino


def _compiled(path: Path, meta: dict, inference_precision: str, threads: int) -> OpenVinoImageEncoder:
    ov = openvino_module()
    config = {"INFERENCE_PRECISION_HINT": inference_precision, "INFERENCE_NUM_THREADS": threads}
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as err:  # OpenVINO raises RuntimeError for every cause
        raise OnnxEngineError(f"OpenVINO {ov.__version__} cannot compile {path}: {first_line(err)}") from err
    return OpenVinoImageEncoder(compiled, Path(path), meta, inference_precision, threads)


def _check_against(encoder: OpenVinoImageEncoder, fp32: OnnxImageEncoder, backbone: ClipBackbone, parity: bool):
    """The compiled model must give finite outputs of the right shape on random crops, and in fp32
    (``parity``) the fp32 export's within ``PARITY_TOLERANCE``."""
    size = backbone.input_size
    crops = np.random.default_rng(0).standard_normal((LOAD_CHECK_CROPS, 3, size, size)).astype(np.float32)
    ours, reference = encoder.encode(crops), fp32.encode(crops)
    if ours.shape != reference.shape or not np.isfinite(ours).all():
        raise OnnxEngineError(
            f"OpenVINO's model of {encoder.path} gives {ours.shape} outputs"
            f"{'' if np.isfinite(ours).all() else ' with NaN or inf'}; expected {reference.shape}: use --engine onnx"
        )
    difference = float(np.abs(ours - reference).max())
    if parity and not difference <= PARITY_TOLERANCE:
        raise OnnxEngineError(
            f"OpenVINO's fp32 run of {encoder.path} differs from ONNX Runtime's by {difference:.2e} "
            f"(> {PARITY_TOLERANCE:g}) on {LOAD_CHECK_CROPS} random crops: use --engine onnx"
        )


def _int8_key(backbone: ClipBackbone, fp32: OnnxImageEncoder) -> dict:
    return {
        **key_fields(backbone),
        "ov_int8_format": OV_INT8_FORMAT,
        "compressed_from_sha256": fp32.meta["sha256"],
        "compression": WEIGHT_COMPRESSION,
    }


def _locked_int8_graph(backbone: ClipBackbone, fp32: OnnxImageEncoder) -> tuple[Path, dict]:
    """The int8 graph beside ``fp32``'s export (reused, or compressed again), and its sidecar; the
    caller holds the export directory's lock."""
    directory = fp32.path.parent
    xml, sidecar = directory / OV_INT8_FILE, directory / OV_INT8_SIDECAR_FILE
    if xml.exists() or sidecar.exists():
        problem = ir_problem(xml, sidecar, _int8_key(backbone, fp32))
        if problem is None:
            return xml, read_sidecar(sidecar)
        say(f"rebuilding {xml}: {problem}")
    return _compress(backbone, fp32, xml, sidecar)


def ir_problem(xml: Path, sidecar: Path, expected: dict) -> str | None:
    """Why the IR ``xml`` (and its .bin) cannot be reused, or None when ``sidecar`` has ``expected``'s
    fields and both files have the sizes and sha256 it records."""
    try:
        meta = read_sidecar(sidecar)
    except (OSError, ValueError) as err:
        return f"{sidecar} is unreadable ({err})"
    wrong = [name for name in expected if meta.get(name) != expected[name]]
    if wrong:
        return f"{sidecar} describes another graph ({', '.join(wrong)} differ)"
    for path, facts in (
        (xml, meta.get("files", {}).get("xml")),
        (xml.with_suffix(".bin"), meta.get("files", {}).get("bin")),
    ):
        if not path.exists():
            return f"{path} is missing"
        if not facts or path.stat().st_size != facts.get("bytes") or file_sha256(path) != facts.get("sha256"):
            return f"{path} does not have the size and sha256 that {sidecar} records (modified or corrupt)"
    return None


def _compress(backbone: ClipBackbone, fp32: OnnxImageEncoder, xml: Path, sidecar: Path) -> tuple[Path, dict]:
    """Compress the fp32 export's weights to int8 into temporary files, then move them into place:
    the .bin, the .xml, and the sidecar last (until it is written a reader finds a mismatch and rebuilds)."""
    ov = openvino_module()
    import nncf

    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")
    start = time.perf_counter()
    try:
        with reporting_write_faults(xml):
            with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress tables on stdout
                nncf.set_log_level(40)  # errors only
                compressed = nncf.compress_weights(
                    ov.Core().read_model(str(fp32.path)), mode=nncf.CompressWeightsMode.INT8_SYM
                )
            ov.save_model(compressed, str(tmp), compress_to_fp16=False)
            seconds = time.perf_counter() - start
            files = {kind: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for kind, path in _ir_files(tmp)}
            meta = {
                **_int8_key(backbone, fp32),
                "random_weights": backbone.random_weights,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
                "files": files,
                "sha256": files["xml"]["sha256"] + files["bin"]["sha256"][:16],
                "compress_seconds": round(seconds, 2),
                "compressed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "versions": {**fp32.meta.get("versions", {}), "openvino": ov.__version__, "nncf": nncf.__version__},
            }
            move_into_place(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            move_into_place(tmp, xml)
            atomic_write_text(sidecar, json.dumps(meta, indent=2))
    finally:
        for _, path in _ir_files(tmp):
            path.unlink(missing_ok=True)
    say(
        f"compressed {backbone.name}'s weights to int8 for OpenVINO in {seconds:.1f} s; checked on your images before use"
    )
    return xml, meta


def _ir_files(xml: Path) -> list:
    return [("xml", xml), ("bin", xml.with_suffix(".bin"))]


def save_deployment_encoder(encoder: OpenVinoImageEncoder, target: Path) -> dict:
    """Write ``encoder`` as OpenVINO IR at ``target`` (.xml and .bin) for a deployment; returns what
    deploy.json says about it."""
    ov = openvino_module()
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.xml")
    try:
        with reporting_write_faults(target):
            if encoder.path.suffix == ".xml":
                for kind, path in _ir_files(encoder.path):
                    shutil.copyfile(path, dict(_ir_files(tmp))[kind])
            else:
                ov.save_model(ov.Core().read_model(str(encoder.path)), str(tmp), compress_to_fp16=False)
            move_into_place(tmp.with_suffix(".bin"), target.with_suffix(".bin"))
            move_into_place(tmp, target)
    finally:
        for _, path in _ir_files(tmp):
            path.unlink(missing_ok=True)
    return {
        "format": "openvino",
        "weights_file": target.with_suffix(".bin").name,
        "weights_bytes": target.with_suffix(".bin").stat().st_size,
        "weights_sha256": file_sha256(target.with_suffix(".bin")),
        "inference_precision": encoder.inference_precision,
        "openvino": ov.__version__,
    }
