"""The image-encoder engines (``--engine``): their names, what each writes into a cache, the cores
they may use, and the checks that need no model. (``extract.cli.engine_backbone`` puts an engine
in charge of a backbone's image tower.)

This module imports neither torch nor onnxruntime: the command line builds its options from it
at start-up, and a re-run of ``extract`` that finds nothing to encode must answer at once
(importing torch alone takes over a second; see README, "Resuming").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from raml.cache.format import fingerprint_field, read_fingerprint
from raml.errors import CacheError

# A precision names how the features are computed; features of two precisions never share a cache.
# The int8 engine's names its quantisation scheme (extract/int8_engine.py): int8 with 7-bit weights,
# whose features are the same on every x86 instruction set.
INT8_PRECISION = "int8-w7"
# OpenVINO's int8 (extract/openvino_engine.py): int8 weights per output channel, each product then
# computed as the CPU plugin chooses for this CPU (int8 kernels with VNNI or AMX).
OPENVINO_INT8_PRECISION = "int8-ov"
BF16_PRECISION = "bf16"  # bfloat16 products with float32 sums (AVX512_BF16 or AMX instructions)
PRECISIONS = {  # what each --engine writes into a cache
    "torch": "fp32",
    "onnx": "fp32",
    "onnx-int8": INT8_PRECISION,
    "torch-bf16": BF16_PRECISION,
    "openvino": "fp32",
    "openvino-int8": OPENVINO_INT8_PRECISION,
    "openvino-bf16": BF16_PRECISION,
}
ENGINES = tuple(PRECISIONS)
AUTO = "auto"  # the fastest engine that passes its fidelity gate here (extract/auto_engine.py)
ENGINE_CHOICES = (AUTO, *ENGINES)
# Precisions that earlier versions wrote and no engine writes now: such caches are read, never added to.
RETIRED_PRECISIONS = {
    "int8": "int8 features of RAML's first quantisation (8-bit weights, whose 16-bit pair sums saturate on CPUs "
    "without VNNI, so that its features depended on the CPU)",
}
FIDELITY_SAMPLE = 32  # images of the user's own data a reduced precision is checked on (ours)
# /proc/cpuinfo flags that give each precision its own arithmetic on x86
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none, e.g. macOS)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` shows it, with its vector extensions (Linux), e.g.
    "AMD EPYC (AVX-512, VNNI, no AMX)"; else what Python's platform module knows. The extensions
    matter: the same model name comes with and without AVX-512, and int8 and bf16 kernels differ
    with VNNI, AVX512_BF16 and AMX."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = cpu_flags()
    extensions = [label for label, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2")) if flag in flags][:1]
    if extensions:
        extensions.append("VNNI" if flags & set(INT8_DOT_FLAGS) else "no VNNI")
        extensions += ["AVX512_BF16"] if "avx512_bf16" in flags else []
        extensions.append("AMX" if "amx_tile" in flags else "no AMX")
    return f"{name} ({', '.join(extensions)})" if extensions else name


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX); without, bf16 is emulated."""
    return bool(cpu_flags() & set(BF16_FLAGS))


def engine_problem(engine: str, device: str = "cpu") -> str | None:
    """Why ``engine`` cannot run here on ``device`` ("cpu", "cuda", ...), or None when it can: a
    package it needs is missing, or the CPU lacks the arithmetic its precision needs."""
    import importlib.util

    on_cpu = str(device).startswith("cpu")
    if engine not in ENGINES:
        return f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}"
    if engine.startswith("onnx") and importlib.util.find_spec("onnxruntime") is None:
        return f"--engine {engine} needs onnxruntime: pip install onnxruntime"
    if engine.startswith("openvino"):
        if importlib.util.find_spec("openvino") is None:
            return f"--engine {engine} needs OpenVINO: pip install 'raml[openvino]'"
        if engine == "openvino-int8" and importlib.util.find_spec("nncf") is None:
            return "--engine openvino-int8 needs NNCF to compress the weights: pip install 'raml[openvino]'"
    if engine != "torch" and engine != "onnx" and not on_cpu:
        return f"--engine {engine} runs on the CPU, not on --device {device}: on a GPU --engine torch runs fp16"
    if PRECISIONS[engine] == BF16_PRECISION and not cpu_has_bf16():
        return (
            f"--engine {engine} needs a CPU with bfloat16 arithmetic ({' or '.join(BF16_FLAGS)} in /proc/cpuinfo); "
            f"{cpu_model()} has none, and emulated bf16 is slower than fp32"
        )
    return None


def say(message: str) -> None:
    """An engine's one-line notice, on stderr (stdout carries the command's results)."""
    print(f"engine: {message}", file=sys.stderr, flush=True)


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_precision(cache_dir) -> str | None:
    """The precision of the features in ``cache_dir``, or None where there is no cache yet."""
    meta = read_fingerprint(Path(cache_dir))
    return None if meta is None else fingerprint_field(meta, "precision")


def check_cache_precision(cache_dir, precision: str) -> None:
    """Refuse before any work when ``cache_dir`` holds features of another precision than ``precision``."""
    cached = cache_precision(cache_dir)
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
            f"Use {engines} (or auto) with this cache, or another --cache-dir."
        )
