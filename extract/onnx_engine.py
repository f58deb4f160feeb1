"""The ONNX Runtime engine for the CLIP image encoder (``--engine onnx``).

On a CPU, ONNX Runtime runs the ViT image tower markedly faster than PyTorch eager, with the same
float32 results. Only the image tower runs here; prompts are encoded once per category by torch,
so ``OnnxClipBackbone`` keeps the torch model for ``encode_texts`` and for verification.

Exports are made once per (model name, weights id, input size) and kept in a user cache::

    <onnx_cache_root()>/<model>-<size>px-<key>/encoder.onnx   pixels [B, 3, S, S] float32 → embedding
                                                              [B, D] float32, L2-normalised, and (ViTs)
                                                              patch_tokens [B, p, p, D] float32, pooled as
                                                              the cache stores them (batch dynamic)
                                               encoder.json   sidecar: what it was exported from, its
                                                              byte size and sha256, the measured parity
                                               .lock          serialises exports between processes

Trust, in three steps: (1) a new export is compared with the torch encoder on random crops before
it is put in place, and refused if the max abs difference exceeds ``PARITY_TOLERANCE``; (2) on
load, the sidecar must describe this backbone and the file must have its recorded size and sha256
(a truncated or modified file is rebuilt); (3) the session is then probed against torch on a couple
of crops, which catches what a key cannot see — a model config edited under the same name, new
open_clip code, another torch's random initialisation — and such a stale export is rebuilt too.
Every rebuild says why on stderr.

The int8 engine (``--engine onnx-int8``, extract/int8_engine.py) quantises the verified fp32
export and keeps the result in the same directory, under the same lock.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from raml.cache.files import (
    make_dirs,
    write_fault,
)
from raml.errors import UserError
from raml.extract.encoder import ClipBackbone, check_patch_tokens, embeddings_and_tokens
from raml.extract.engines import usable_cores
from raml.extract.identity import file_sha256
from raml.extract.onnx_files import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    SIDECAR_FILE,
    TOKENS_NAME,
    export_dir,
    export_lock,
    key_fields,
    publish_encoder,
    read_sidecar,
    sidecar_fields,
)
from raml.extract.pyramid import normalise_crops

PARITY_TOLERANCE = 1e-4  # max abs difference from the torch encoder, float32
EXPORT_CHECK_CROPS = 4  # random crops compared before a new export is accepted
LOAD_CHECK_CROPS = 2  # random crops compared each time an existing export is opened

CPU_CROPS_PER_RUN = 8  # see OnnxImageEncoder.encode


class OnnxEngineError(UserError):
    """The ONNX engine cannot run: a package is missing, or an export does not match torch."""


@dataclass
class OnnxImageEncoder:
    """A verified ONNX Runtime session of a backbone's image tower, and the export it runs."""

    session: object  # onnxruntime.InferenceSession
    path: Path  # the .onnx file (the deploy export copies it)
    meta: dict  # its sidecar: model, weights, input size, normalisation, sha256, parity
    provider: str  # the execution provider that runs it
    cpu_crops_per_run: int = CPU_CROPS_PER_RUN  # crops per session run on the CPU (int8: see int8_engine)

    def describe(self) -> str:
        """Which provider runs it, with how many threads, from which file (the line each command prints)."""
        threads = self.session.get_session_options().intra_op_num_threads
        return f"{self.provider}, {threads} threads, {self.path}"

    def encode(self, pixels: np.ndarray, with_tokens: bool = False):
        """[B, 3, S, S] normalised pixels → [B, D] float32 L2-normalised embeddings; ``with_tokens``:
        and the patch tokens of the same run, [B, p, p, D] (``extract.encoder.embeddings_and_tokens``).

        On the CPU the crops go through in runs of ``cpu_crops_per_run``: ViT-B/16 measured 1.85 s
        per image (21 crops) in runs of 8 against 2.54 s in one run of 168, whose activations no
        longer fit the caches. GPUs take the whole batch.
        """
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        outputs = [OUTPUT_NAME, TOKENS_NAME] if with_tokens else [OUTPUT_NAME]
        step = self.cpu_crops_per_run if self.provider == "CPUExecutionProvider" else len(pixels)
        runs = [
            self.session.run(outputs, {INPUT_NAME: pixels[i : i + step]}) for i in range(0, len(pixels), max(step, 1))
        ]
        joined = (
            [np.concatenate([run[k] for run in runs]) for k in range(len(outputs))]
            if runs
            else [np.zeros((0, self.meta["embed_dim"]), np.float32)]
        )
        return tuple(joined) if with_tokens else joined[0]


@dataclass(kw_only=True)
class OnnxClipBackbone(ClipBackbone):
    """A ``ClipBackbone`` whose image tower runs in ONNX Runtime; prompts still go through torch."""

    image_encoder: OnnxImageEncoder  # or extract.openvino_engine's encoder, which runs the same export
    engine: str = "onnx"
    # below fp32 only: the verified fp32 encoder, which the fidelity gate (extract/fidelity.py) compares it with
    reference_encoder: OnnxImageEncoder | None = None

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.image_encoder.encode(pixels)

    def reference_encode(self, pixels: np.ndarray) -> np.ndarray:
        """The fp32 embeddings of ``pixels`` that the fidelity gate compares ``encode_images``' with."""
        if self.reference_encoder is None:
            raise ValueError(f"--engine {self.engine} is fp32: it has no reference to be compared with")
        return self.reference_encoder.encode(pixels)

    @property
    def fidelity_key(self) -> str:
        """What a fidelity check of this encoder is recorded under: the engine and its file's sha256."""
        return f"{self.engine}:{self.image_encoder.meta['sha256']}"

    @property
    def crops_device(self) -> torch.device:
        return torch.device("cpu")

    def encode_crops(self, crops: torch.Tensor) -> np.ndarray:
        """uint8 crops → embeddings; ONNX Runtime takes float32 numpy, so they are normalised on the CPU."""
        return self.encode_images(normalise_crops(crops.cpu(), self.mean, self.std).numpy())

    def encode_crops_and_tokens(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``encode_crops`` and, from the same run of the graph, the pooled patch tokens."""
        check_patch_tokens(self.model.visual, self.name)
        return self.image_encoder.encode(normalise_crops(crops.cpu(), self.mean, self.std).numpy(), with_tokens=True)


def onnx_backbone(
    backbone: ClipBackbone, *, cache_root: Path | None = None, threads: int | None = None
) -> OnnxClipBackbone:
    """``backbone`` with its image encoder replaced by the verified ONNX one (see ``onnx_image_encoder``)."""
    encoder = onnx_image_encoder(backbone, cache_root=cache_root, threads=threads)
    return OnnxClipBackbone(**torch_fields(backbone), image_encoder=encoder)


def torch_fields(backbone: ClipBackbone) -> dict:
    """The fields of the torch ``ClipBackbone`` that an ONNX backbone shares (not what runs it)."""
    return {f.name: getattr(backbone, f.name) for f in fields(ClipBackbone) if f.name not in ("engine", "precision")}


def onnx_image_encoder(
    backbone: ClipBackbone, *, cache_root: Path | None = None, threads: int | None = None
) -> OnnxImageEncoder:
    """The ONNX Runtime session of ``backbone``'s image tower, checked against torch.

    Reuses the cached export when it is intact and still matches torch; otherwise (first use,
    corrupt, stale) exports it again, verifies it and replaces the cached one, saying why on stderr.
    ``threads`` defaults to every core this process may use. Raises ``OnnxEngineError``.
    """
    directory = export_dir(backbone, cache_root)
    make_dirs(directory)
    with export_lock(directory):
        encoder = locked_fp32_encoder(backbone, directory, threads)
    say(encoder.describe())
    return encoder


def locked_fp32_encoder(backbone: ClipBackbone, directory: Path, threads: int | None) -> OnnxImageEncoder:
    """The verified fp32 encoder in ``directory`` (reused, or exported again); the caller holds its lock."""
    ort = onnxruntime_module()
    providers = _providers(ort, backbone.device)
    options = session_options(ort, threads)
    encoder, problem = _open_cached(directory, backbone, ort, options, providers)
    if encoder is None:
        if problem:
            say(f"rebuilding {directory / ONNX_FILE}: {problem}")
        encoder = _export_verified(backbone, directory, ort, options, providers)
    return encoder


def export_problem(directory: Path, backbone: ClipBackbone) -> str | None:
    """Why the export in ``directory`` cannot be reused for ``backbone``, or ``None`` when its
    sidecar describes this backbone and the file has the size and sha256 the sidecar records."""
    return file_problem(directory / ONNX_FILE, directory / SIDECAR_FILE, key_fields(backbone))


def file_problem(path: Path, sidecar: Path, expected: dict) -> str | None:
    """Why ``path`` cannot be reused, or ``None`` when ``sidecar`` has every field of ``expected``
    with the same value and ``path`` has the size and sha256 the sidecar records."""
    if not path.exists():
        return f"{path} is missing"
    try:
        meta = read_sidecar(sidecar)
    except (OSError, ValueError) as err:
        return f"{sidecar} is unreadable ({err})"
    wrong = [name for name in expected if meta.get(name) != expected[name]]
    if wrong:
        return (
            f"{sidecar} describes another encoder ("
            + ", ".join(f"{name}: {meta.get(name)!r}, expected {expected[name]!r}" for name in wrong)
            + ")"
        )
    size = path.stat().st_size
    if size != meta.get("bytes"):
        return f"{path} has {size} bytes, {sidecar} says {meta.get('bytes')} (truncated or modified)"
    if file_sha256(path) != meta.get("sha256"):
        return f"{path} does not have the sha256 that {sidecar} records (modified or corrupt)"
    return None


def max_abs_difference(session, backbone: ClipBackbone, n_crops: int, seed: int = 0) -> float:
    """Max abs difference between ``session`` and the torch encoder (float32) on random crops, over
    every output (the embeddings and, for ViTs, the patch tokens)."""
    size = backbone.input_size
    crops = np.random.default_rng(seed).standard_normal((n_crops, 3, size, size)).astype(np.float32)
    onnx_out = session.run(None, {INPUT_NAME: crops})
    torch_out = _torch_fp32_outputs(backbone, crops)
    if len(onnx_out) != len(torch_out):
        return float("inf")  # an export of another contract (another EXPORT_FORMAT)
    return float(max(np.abs(ours - reference).max() for ours, reference in zip(onnx_out, torch_out)))


def has_patch_tokens(visual: torch.nn.Module) -> bool:
    try:
        check_patch_tokens(visual, "")
        return True
    except UserError:
        return False


class _NormalisedImageEncoder(torch.nn.Module):
    """The graph that is exported: the torch engine's ``encode_images`` in float32, and for ViTs the
    patch tokens of the same pass (``encode_crops_and_tokens``)."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip
        self.outputs = [OUTPUT_NAME, TOKENS_NAME] if has_patch_tokens(clip.visual) else [OUTPUT_NAME]

    def forward(self, pixels: torch.Tensor):
        if len(self.outputs) == 1:
            return torch.nn.functional.normalize(self.clip.encode_image(pixels), dim=-1)
        embedding, tokens = embeddings_and_tokens(self.clip.visual, pixels)
        return torch.nn.functional.normalize(embedding, dim=-1), tokens


@torch.inference_mode()
def _torch_fp32_outputs(backbone: ClipBackbone, crops: np.ndarray) -> list[np.ndarray]:
    """The reference: torch in float32 (no autocast, even on CUDA), each output of the graph."""
    batch = torch.from_numpy(crops).to(backbone.device)
    outputs = _NormalisedImageEncoder(backbone.model)(batch)
    return [output.float().cpu().numpy() for output in (outputs if isinstance(outputs, tuple) else (outputs,))]


def _open_cached(directory: Path, backbone: ClipBackbone, ort, options, providers):
    """``(encoder, None)`` when the cached export is intact and matches torch; ``(None, why not)``
    otherwise, and ``(None, None)`` when nothing was cached yet."""
    if not (directory / ONNX_FILE).exists() and not (directory / SIDECAR_FILE).exists():
        return None, None
    problem = export_problem(directory, backbone)
    if problem:
        return None, problem
    path = directory / ONNX_FILE
    try:
        session = open_session(ort, path, options, providers)
    except OnnxEngineError as err:
        return None, str(err)
    diff = max_abs_difference(session, backbone, LOAD_CHECK_CROPS)
    if not diff <= PARITY_TOLERANCE:
        return None, (
            f"its output differs from the torch encoder by {diff:.2e} (> {PARITY_TOLERANCE:g}): "
            "stale (the model's config, code or weights changed under the same name)"
        )
    return OnnxImageEncoder(session, path, read_sidecar(directory / SIDECAR_FILE), session.get_providers()[0]), None


def _export_verified(backbone: ClipBackbone, directory: Path, ort, options, providers) -> OnnxImageEncoder:
    """Export to a temporary file, verify it against torch, then move it and its sidecar into place."""
    path, tmp = directory / ONNX_FILE, directory / f".{ONNX_FILE}.{os.getpid()}.tmp"
    start = time.perf_counter()
    try:
        _export_graph(backbone, tmp)
        seconds = time.perf_counter() - start
        session = open_session(ort, tmp, options, providers)
        diff = max_abs_difference(session, backbone, EXPORT_CHECK_CROPS)
        if not diff <= PARITY_TOLERANCE:  # written so that NaN fails too
            raise OnnxEngineError(
                f"ONNX export of {backbone.name} ({backbone.weights}) does not match the torch encoder: "
                f"max abs difference {diff:.2e} on {EXPORT_CHECK_CROPS} random crops, tolerance "
                f"{PARITY_TOLERANCE:g}. Nothing was cached in {directory}; use --engine torch."
            )
        meta = {
            **sidecar_fields(key_fields(backbone), backbone, tmp, ort),
            "max_abs_diff": diff,
            "checked_crops": EXPORT_CHECK_CROPS,
            "tolerance": PARITY_TOLERANCE,
            "export_seconds": round(seconds, 2),
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        publish_encoder(tmp, path, directory / SIDECAR_FILE, meta)
    finally:
        tmp.unlink(missing_ok=True)
    say(
        f"exported {backbone.name} image encoder in {seconds:.1f} s; max |onnx - torch| = {diff:.1e} "
        f"on {EXPORT_CHECK_CROPS} random crops (tolerance {PARITY_TOLERANCE:g})"
    )
    return OnnxImageEncoder(session, path, meta, session.get_providers()[0])


def _export_graph(backbone: ClipBackbone, path: Path) -> None:
    """torch.onnx (dynamo exporter, needs onnx and onnxscript) → one self-contained file, batch dynamic."""
    size = backbone.input_size
    example = torch.randn(2, 3, size, size, device=backbone.device)  # 2, not 1: size-1 dims get specialised
    graph = _NormalisedImageEncoder(backbone.model).eval()
    try:
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=graph.outputs,
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
            external_data=False,  # one file: hashed, copied and replaced as a unit
            dynamo=True,
            verbose=False,
        )  # verbose=False: no progress lines on stdout
    except ImportError as err:
        raise OnnxEngineError(
            f"exporting to ONNX needs the onnx and onnxscript packages ({err}): pip install onnx onnxscript"
        ) from err
    except Exception as err:  # the exporter raises many types: a full disk, or "this model does not export"
        raise write_fault(err, path) or OnnxEngineError(
            f"torch.onnx could not export the image encoder of {backbone.name}: {first_line(err)}. Use --engine torch."
        ) from err


def open_session(ort, path: Path, options, providers):
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise OnnxEngineError(f"onnxruntime {ort.__version__} cannot load {path}: {first_line(err)}") from err


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxEngineError(
            f"--engine onnx needs onnxruntime ({err}): pip install onnxruntime (or onnxruntime-gpu on a CUDA machine)"
        ) from err
    return onnxruntime


def _providers(ort, device: torch.device) -> list:
    """CUDA when the backbone runs on CUDA and this onnxruntime has it; the CPU otherwise."""
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            index = device.index if device.index is not None else torch.cuda.current_device()
            # TF32 is on by default in onnxruntime's CUDA provider; it would break float32 parity.
            return [("CUDAExecutionProvider", {"device_id": index, "use_tf32": 0}), "CPUExecutionProvider"]
        say(
            f"--device {device}, but this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu "
            "instead of onnxruntime): the encoder runs on the CPU"
        )
    return ["CPUExecutionProvider"]


def session_options(ort, threads: int | None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    # Idle ORT threads would otherwise busy-wait, taking the cores the image-decoding workers need
    # (extract decodes and encodes at the same time); on a shared 2-core CPU this measured faster.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the exported graph triggers harmless optimiser warnings
    return options


def say(message: str) -> None:
    print(f"onnx engine: {message}", file=sys.stderr, flush=True)
