"""``--engine auto``: the fastest engine that passes its fidelity gate on this CPU.

The engines this machine can run (``extract.engines.engine_problem``) are timed once on one image's
21 random crops (best of ``TIMED_RUNS`` after a warm-up), and the figures are remembered per machine
and model in ``<user cache>/engines/<key>.json``, like the ONNX export: the key holds the CPU (model
name and the flags of its arithmetic), the threads, the backbone (name, config, weights, input
size) and the versions of the runtimes, so another CPU, another model or a new runtime is timed
again. A later run reads the ranking without timing anything.

The engines are then tried fastest first: an fp32 engine is taken as it is; one below fp32 is taken
once its fidelity gate passes on the user's own images (the caller's ``check``), and an engine the
gate refuses is passed over, saying why. On a GPU, auto is ``torch`` (fp16 on CUDA).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path

from raml.cache.files import atomic_write_text, make_dirs, user_cache_root
from raml.extract.engines import ENGINES, PRECISIONS, cpu_flags, cpu_model, engine_problem, say

TIMED_RUNS = 2  # runs per engine after its warm-up; the best counts (load on a shared machine only slows)
RUNTIMES = ("torch", "onnxruntime", "openvino", "nncf", "open_clip_torch")
ARITHMETIC_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def candidates(device: str, precision: str | None = None) -> list[str]:
    """The engines that can run here on ``device``, of ``precision`` when given (a cache's)."""
    return [
        engine
        for engine in ENGINES
        if (precision is None or PRECISIONS[engine] == precision) and engine_problem(engine, device) is None
    ]


def ranking_key(backbone, threads: int) -> dict:
    """What the timings depend on: this CPU, the threads, the model and the runtimes' versions."""
    versions = {}
    for name in RUNTIMES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(),
        "flags": sorted(cpu_flags() & set(ARITHMETIC_FLAGS)),
        "threads": threads,
        "model": backbone.name,
        "model_config": backbone.model_config,
        "weights": backbone.weights,
        "input_size": backbone.input_size,
        "versions": versions,
    }


def timings_path(key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root or user_cache_root() / "engines") / f"{key['model']}-{digest}.json"


def read_timings(path: Path) -> dict:
    """engine → seconds per image (or the reason it failed), as remembered at ``path``; {} when none."""
    try:
        timings = json.loads(path.read_text()).get("seconds_per_image", {})
    except (OSError, ValueError, AttributeError):
        return {}  # none yet, or unreadable: timed again and rewritten
    return timings if isinstance(timings, dict) else {}


def time_engine(backbone) -> float:
    """Seconds per image of ``backbone.encode_images`` on one image's 21 random crops: the best of
    ``TIMED_RUNS`` after a warm-up."""
    import numpy as np

    from raml.cache import N_CROPS

    size = backbone.input_size
    crops = np.random.default_rng(0).standard_normal((N_CROPS, 3, size, size)).astype(np.float32)
    backbone.encode_images(crops)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        backbone.encode_images(crops)
        best = min(best, time.perf_counter() - start)
    return best


def engine_ranking(torch_backbone, build, engines: list[str], *, threads: int, root: Path | None = None, measure=None):
    """``engines`` fastest first on this machine, and their seconds per image (a failed one: its
    reason; it is left out of the ranking). What is not remembered yet is timed (``measure``,
    default ``time_engine``, on the backbone ``build(engine)`` gives) and remembered."""
    measure = measure or time_engine
    key = ranking_key(torch_backbone, threads)
    path = timings_path(key, root)
    timings = read_timings(path)
    missing = [engine for engine in engines if engine not in timings]
    for engine in missing:
        say(f"auto: timing --engine {engine} on this CPU once (remembered in {path})")
        try:
            timings[engine] = round(measure(build(engine)), 4)
        except Exception as err:  # an engine that cannot be built here is not a candidate, and says why
            timings[engine] = (
                f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            )
    if missing:
        make_dirs(path.parent)
        atomic_write_text(path, json.dumps({"key": key, "seconds_per_image": timings}, indent=2))
    ranked = sorted((engine for engine in engines if isinstance(timings[engine], (int, float))), key=timings.get)
    return ranked, timings


def choose_engine(torch_backbone, build, check, *, precision: str | None = None, threads: int, root=None, measure=None):
    """The backbone of the fastest engine here whose fidelity gate passes: ``build(engine)`` makes
    it, ``check(backbone)`` runs its gate (raises ``FidelityError`` to refuse it). Only engines of
    ``precision`` when given (a cache's). Says what it picked, and why faster ones were passed over."""
    from raml.errors import UserError
    from raml.extract.fidelity import FidelityError

    if torch_backbone.device.type != "cpu":
        say(f"auto: --engine torch on {torch_backbone.device} (fp16 on the GPU)")
        return torch_backbone
    engines = candidates("cpu", precision)
    ranked, timings = engine_ranking(torch_backbone, build, engines, threads=threads, root=root, measure=measure)
    passed_over = []
    for engine in ranked:
        backbone = build(engine)
        if backbone.precision != "fp32":
            try:
                check(backbone)
            except FidelityError as err:
                passed_over.append(f"{engine} ({err})")
                say(f"auto: --engine {engine} is not used: {err}")
                continue
        figures = ", ".join(
            f"{e} {timings[e]:.2f} s" if isinstance(timings[e], (int, float)) else f"{e} {timings[e]}" for e in engines
        )
        say(
            f"auto: picked --engine {engine} ({PRECISIONS[engine]}), the fastest here that passes its fidelity gate "
            f"(per image: {figures})"
        )
        return backbone
    raise UserError(
        f"--engine auto: no engine{' of precision ' + precision if precision else ''} can run here"
        + (f"; passed over: {'; '.join(passed_over)}" if passed_over else "")
    )
