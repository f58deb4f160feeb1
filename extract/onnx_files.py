"""The ONNX export cache's files: where a backbone's exports live (RAML's user cache directory, a
folder per backbone), the sidecar JSON that says what each encoder file is, putting a checked file
in place, and the lock that lets one process at a time export into a folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import torch

from raml.cache.files import atomic_write_text, move_into_place, reporting_write_faults, user_cache_root
from raml.extract.encoder import ClipBackbone
from raml.extract.identity import file_sha256

EXPORT_FORMAT = 2  # bump when the graph's contract changes: older exports are then rebuilt (2: patch tokens)
INPUT_NAME, OUTPUT_NAME, TOKENS_NAME = "pixels", "embedding", "patch_tokens"
ONNX_FILE, SIDECAR_FILE, LOCK_FILE = "encoder.onnx", "encoder.json", ".lock"

try:  # POSIX: several extract processes (--shard i/n, torchrun) must not export at the same time
    import fcntl
except ImportError:  # Windows: no lock; each file is still replaced atomically and checked on load
    fcntl = None


def onnx_cache_root() -> Path:
    """``onnx`` in RAML's user cache directory (``cache.files.user_cache_root``)."""
    return user_cache_root() / "onnx"


def export_dir(backbone: ClipBackbone, cache_root: Path | None = None) -> Path:
    """Where ``backbone``'s export lives: readable model name and size, plus a hash of the whole key."""
    key = json.dumps(key_fields(backbone), sort_keys=True)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone.name)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_root or onnx_cache_root()) / f"{readable}-{backbone.input_size}px-{digest}"


@contextlib.contextmanager
def export_lock(directory: Path):
    """Hold ``directory``'s lock: one process at a time exports or quantises into it."""
    if fcntl is None:
        yield
        return
    with open(directory / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def key_fields(backbone: ClipBackbone) -> dict:
    """The sidecar fields that must equal the backbone's for an export to be reused."""
    return {
        "format": EXPORT_FORMAT,
        "model": backbone.name,
        "weights": backbone.weights,
        "input_size": backbone.input_size,
        "embed_dim": backbone.embed_dim,
    }


def read_sidecar(path: Path) -> dict:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def publish_encoder(model_tmp: Path, model_path: Path, sidecar_path: Path, meta: dict) -> None:
    """Put a checked encoder file in place. The sidecar goes last: until it is written, a reader
    finds a file/sidecar mismatch and rebuilds."""
    with reporting_write_faults(model_path):
        move_into_place(model_tmp, model_path)
    atomic_write_text(sidecar_path, json.dumps(meta, indent=2))


def sidecar_fields(key: dict, backbone: ClipBackbone, model_file: Path, ort) -> dict:
    """What the sidecar of every cached encoder file records: its key, the pixels it expects, its input
    and output, its size and hash, and the versions that built it."""
    import onnx
    import open_clip

    return {
        **key,
        "random_weights": backbone.random_weights,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "output_is": "L2-normalised float32 image embedding",
        "patch_tokens": TOKENS_NAME,
        "patch_tokens_are": "the crop's patch tokens in the same space, pooled as cache/tokens.py says (ViTs)",
        "bytes": model_file.stat().st_size,
        "sha256": file_sha256(model_file),
        "versions": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
