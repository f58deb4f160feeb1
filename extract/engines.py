"""The image-encoder engines (``--engine``): their names, what each writes into a cache, the cores
they may use, and the checks that need no model. (``extract.cli.engine_backbone`` puts an engine
in charge of a backbone's image tower.)

This module imports neither torch nor onnxruntime: the command line builds its options from it
at start-up, and a re-run of ``extract`` that finds nothing to encode must answer at once
(importing torch alone takes over a second; see README, "Resuming").
"""

from __future__ import annotations

import os
from pathlib import Path

from raml.cache.format import fingerprint_field, read_fingerprint
from raml.errors import CacheError

# The int8 engine's precision names its quantisation scheme (extract/int8_engine.py): int8 with
# 7-bit weights, whose features are the same on every x86 instruction set. Features of two schemes
# never share a cache.
INT8_PRECISION = "int8-w7"
PRECISIONS = {"torch": "fp32", "onnx": "fp32", "onnx-int8": INT8_PRECISION}  # what each --engine writes into a cache
ENGINES = tuple(PRECISIONS)
# Precisions that earlier versions wrote and no engine writes now: such caches are read, never added to.
RETIRED_PRECISIONS = {
    "int8": "int8 features of RAML's first quantisation (8-bit weights, whose 16-bit pair sums saturate on CPUs "
    "without VNNI, so that its features depended on the CPU)",
}
FIDELITY_SAMPLE = 32  # images of the user's own data the int8 check encodes both ways


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_cache_precision(cache_dir, precision: str) -> None:
    """Refuse before any work when ``cache_dir`` holds features of another precision than ``precision``."""
    meta = read_fingerprint(Path(cache_dir))
    cached = None if meta is None else fingerprint_field(meta, "precision")
    if cached in RETIRED_PRECISIONS:
        raise CacheError(
            f"{cache_dir} holds {RETIRED_PRECISIONS[cached]}; no engine writes those any more, so "
            f"nothing can be added to it (train and evaluate still read it). Extract into another "
            "--cache-dir."
        )
    if cached is not None and cached != precision:
        engines = " or ".join(f"--engine {e}" for e, p in PRECISIONS.items() if p == cached)
        raise CacheError(
            f"{cache_dir} holds {cached} features; this run would add {precision} features, and one "
            f"cache never mixes precisions (a head would train or score on two encoders at once). "
            f"Use {engines} with this cache, or another --cache-dir."
        )
