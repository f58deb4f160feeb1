"""The image-encoder engines (``--engine``), what each writes into a cache, the cores they may
use, and the checks that need no model.

This module imports neither torch nor onnxruntime: the command line builds its options from it
at start-up, and a re-run of ``extract`` that finds nothing to encode must answer at once
(importing torch alone takes over a second; see README, "Resuming").
"""
from __future__ import annotations

import os
from pathlib import Path

from cache import CacheError
from cache.store import fingerprint_field, read_fingerprint

PRECISIONS = {"torch": "fp32", "onnx": "fp32", "onnx-int8": "int8"}  # what each --engine writes into a cache
ENGINES = tuple(PRECISIONS)
FIDELITY_SAMPLE = 32       # images of the user's own data the int8 check encodes both ways (issue 13's default)


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_cache_precision(cache_dir, precision: str) -> None:
    """Refuse before any work when ``cache_dir`` holds features of another precision than ``precision``."""
    meta = read_fingerprint(Path(cache_dir))
    cached = None if meta is None else fingerprint_field(meta, "precision")
    if cached is not None and cached != precision:
        engines = " or ".join(f"--engine {e}" for e, p in PRECISIONS.items() if p == cached)
        raise CacheError(f"{cache_dir} holds {cached} features; this run would add {precision} features, and one "
                         f"cache never mixes precisions (a head would train or score on two encoders at once). "
                         f"Use {engines} with this cache, or another --cache-dir.")
