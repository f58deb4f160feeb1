"""The command-line side of the image-encoder engines: ``--engine`` (with ``auto``),
``--fidelity-sample``, the options that compare engines, and putting an engine in charge of a
loaded backbone, its fidelity gate included. Shared by ``extract``, ``predict`` and the benches.
"""

from __future__ import annotations

import click

from raml.cli.options import text_list
from raml.extract.config import ExtractConfig
from raml.extract.engines import AUTO, ENGINE_CHOICES, ENGINES

ENGINES_HELP = (
    "Runtime of the CLIP image encoder: torch (eager; fp16 on a GPU); onnx (ONNX Runtime fp32, faster on CPUs; "
    "exported once into $RAML_CACHE_DIR/onnx or ~/.cache/raml/onnx and checked against torch); onnx-int8 (that "
    "export quantised to int8, CPU only); torch-bf16 (bfloat16 weights, CPUs with AVX512_BF16 or AMX); openvino, "
    "openvino-int8, openvino-bf16 (the same export run by OpenVINO: pip install 'raml[openvino]'); auto (the "
    "fastest of these that runs here and passes its fidelity gate, timed once per machine and model). Every "
    "engine below fp32 is checked against fp32 on your own images on first use, and refused below its limits."
)


def fidelity_sample_option(when):
    """--fidelity-sample: how many of the user's images the fidelity gate encodes both ways."""
    return click.option(
        "--fidelity-sample",
        default=ExtractConfig.default("fidelity_sample"),
        show_default=True,
        type=click.IntRange(1, 10_000),
        help=f"With {when}: images of your own that the gate encodes with fp32 and the engine's precision.",
    )


def engine_option(default: str = ExtractConfig.default("engine"), choices=ENGINE_CHOICES):
    """--engine: which runtime encodes the crops (``default``: extract's; predict's is auto)."""
    return click.option("--engine", type=click.Choice(choices), default=default, show_default=True, help=ENGINES_HELP)


def engine_options(default: str = ExtractConfig.default("engine")):
    """--engine, and the size of the fidelity gate's sample."""

    def decorate(func):
        return engine_option(default)(fidelity_sample_option("an engine below fp32 (or auto)")(func))

    return decorate


def engine_backbone(backbone, engine: str, *, cache_root=None, threads: int | None = None):
    """``backbone`` (a torch ``ClipBackbone``) with its image encoder run by ``engine``, one of
    ``extract.engines.ENGINES`` (not auto: ``gated_backbone``). The engines' modules are imported only
    when one is asked for."""
    if engine == "torch":
        return backbone
    if engine == "onnx":
        from raml.extract.onnx_engine import onnx_backbone

        return onnx_backbone(backbone, cache_root=cache_root, threads=threads)
    if engine == "onnx-int8":
        from raml.extract.int8_engine import int8_backbone

        return int8_backbone(backbone, cache_root=cache_root, threads=threads)
    if engine == "torch-bf16":
        from raml.extract.bf16_engine import bf16_backbone

        return bf16_backbone(backbone)
    if engine.startswith("openvino"):
        from raml.extract.openvino_engine import openvino_backbone

        return openvino_backbone(backbone, engine, cache_root=cache_root, threads=threads)
    raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def gated_backbone(backbone, engine: str, check, *, precision: str | None = None, cache_root=None):
    """``backbone`` run by ``engine``, through its fidelity gate: ``check(engine_backbone)`` (raises
    ``extract.fidelity.FidelityError`` to refuse) runs for every engine below fp32. ``auto`` picks the
    fastest engine here whose gate passes (extract/auto_engine.py), of ``precision`` when given."""
    if engine != AUTO:
        chosen = engine_backbone(backbone, engine, cache_root=cache_root)
        if chosen.precision != "fp32":
            check(chosen)
        return chosen
    import torch

    from raml.extract.auto_engine import choose_engine

    built = {}

    def build(name):
        if name not in built:
            built[name] = engine_backbone(backbone, name, cache_root=cache_root)
        return built[name]

    return choose_engine(backbone, build, check, precision=precision, threads=torch.get_num_threads())


def engine_list(ctx, param, text):
    return text_list(choices=ENGINES, accepted=f"engines among {', '.join(ENGINES)}", allow_empty=True)(
        ctx, param, text
    )


compare_options = [
    click.option(
        "--engines",
        default=",".join(ENGINES),
        show_default=True,
        callback=engine_list,
        help='Engines compared side by side, comma-separated ("" for none; an engine this machine cannot '
        "run is left out, saying why).",
    ),
    click.option(
        "--rounds",
        default=3,
        show_default=True,
        type=click.IntRange(1, 100),
        help="Rounds of the comparison; each times every engine once (interleaved); medians are shown.",
    ),
]


def engine_backbones(backbone, engines):
    """One backbone per engine that can run here, sharing ``backbone``'s torch model, all on torch's
    thread count (the floors'), so that the engines are compared on the same cores; an engine that
    cannot run here is left out, saying why on stderr."""
    import torch

    from raml.extract.engines import engine_problem

    runnable = {}
    for engine in engines:
        problem = engine_problem(engine, backbone.device.type)
        if problem:
            click.secho(f"bench: {engine} left out: {problem}", fg="yellow", err=True)
            continue
        runnable[engine] = engine_backbone(backbone, engine, threads=torch.get_num_threads())
    return runnable
