"""The image-encoder engines side by side on this machine, against the floor of each precision.

``bench extract`` times the encoder alone (one image's 21 crops); ``bench predict``
(evaluate/deploy/bench.py) times a whole prediction. Both report seconds per image for each engine and
its ratio to the machine's floors, so that figures from different machines can be compared::

    floor of a precision = multiply-accumulates of one image's 21 crops (``vit_macs_per_image``;
                           ViT-B/16: 369 G, "370 GFLOP per image")
                           ÷ the operations per second of a 2048² matrix product in that precision,
                           on the same threads

measured in the same run for each precision the CPU has: fp32 (torch), bf16 (torch, where the CPU
has AVX512_BF16 or AMX; elsewhere torch emulates it, and its rate is shown but is no floor) and
int8 (ONNX Runtime's uint8 × int8 product, the int8 engines' kernel: VNNI or AMX where present,
else AVX2's 16-bit pair sums). Each engine is set against the floor of its own precision and
against the lowest floor of the machine: the CPU's best arithmetic.

A floor counts one multiply-accumulate against one operation of the product although it costs
two: an engine running every product at the matrix product's speed would take 2× its floor.

Rounds interleave the engines: each round measures the products and every engine once, and the
figures are medians over rounds, so that load coming and going on a shared machine hits every
engine alike.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raml.cache import N_CROPS
from raml.errors import UserError
from raml.extract.engines import BF16_FLAGS, INT8_DOT_FLAGS, PRECISIONS, cpu_flags, cpu_has_bf16, cpu_model

GEMM_SIZE = 2048  # large enough to run at the machine's peak, small enough to take ~0.1 s in fp32
GEMM_REPEATS = 3  # products per measurement
EMULATED_GEMM_SIZE = 512  # bf16 without hardware support: a smaller product shows its rate in a fraction of the time


def precision_family(engine: str) -> str:
    """The arithmetic an engine's products run in: "fp32", "bf16" or "int8"."""
    precision = PRECISIONS.get(engine, "fp32")
    return "int8" if precision.startswith("int8") else precision


@dataclass
class EngineTimes:
    """Seconds per image of each engine, one figure per round, and each precision's product rate per round."""

    what: str  # what one "image" costs here, e.g. "encoder, 21 crops"
    model: str
    macs_per_image: float
    rates: dict = field(default_factory=dict)  # precision → [G operations/s, one per round]
    seconds: dict = field(default_factory=dict)  # engine → [seconds per image, one per round]
    reference: str | None = None  # an engine that is not ours (e.g. WinCLIP): ratios to it
    hardware: dict = field(default_factory=dict)  # precision → the instructions behind its rate

    def median(self, engine: str) -> float:
        return statistics.median(self.seconds[engine])

    def floor_seconds(self, precision: str = "fp32") -> float:
        return self.macs_per_image / (statistics.median(self.rates[precision]) * 1e9)

    def is_floor(self, precision: str) -> bool:
        """Whether ``precision``'s rate is the CPU's own arithmetic (not an emulation)."""
        return precision in self.rates and "emulated" not in self.hardware.get(precision, "")

    @property
    def best_precision(self) -> str:
        """The precision with the lowest floor: the CPU's best arithmetic."""
        return min((p for p in self.rates if self.is_floor(p)), key=self.floor_seconds)

    def lines(self) -> list[str]:
        lines = [
            f"{self.what}: {self.model}; CPU {cpu_model()}, {torch.get_num_threads()} threads; median of "
            f"{len(next(iter(self.rates.values())))} rounds (engines interleaved)"
        ]
        for precision, rates in self.rates.items():
            rate = statistics.median(rates)
            how = self.hardware.get(precision, "")
            text = (
                f"  {precision} floor: {self.macs_per_image / 1e9:.1f} G multiply-accumulates per image / "
                f"{_rate(rate)} G{'FL' if precision != 'int8' else ''}OP/s ({how}, {_rate(min(rates))}-{_rate(max(rates))})"
            )
            lines.append(
                text + (f" = {self.floor_seconds(precision):.2f} s" if self.is_floor(precision) else ": no floor")
            )
        best = self.best_precision
        for engine, times in self.seconds.items():
            line = f"  {engine:<13} {self.median(engine):7.2f} s/image ({min(times):.2f}-{max(times):.2f})"
            if engine != self.reference:  # the floors are our model's; the reference runs another one
                own = precision_family(engine)
                if self.is_floor(own):
                    line += f"  {self.median(engine) / self.floor_seconds(own):5.2f} × {own} floor"
                else:
                    line += f"  ({own}: no floor here)"
                if best != own:
                    line += f"  {self.median(engine) / self.floor_seconds(best):5.2f} × {best} floor"
                if self.reference:
                    line += f"  {self.median(engine) / self.median(self.reference):5.2f} × {self.reference}"
            lines.append(line)
        return lines


def _rate(value: float) -> str:
    """A product rate, whole above 10 (AMX: thousands), two digits below (emulated bf16: fractions)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def hardware_of(precision: str) -> str:
    """The instructions behind ``precision``'s products on this CPU, in words."""
    flags = cpu_flags()
    if precision == "bf16":
        have = [flag for flag in BF16_FLAGS if flag in flags]
        return "+".join(have) if have else "emulated: no AVX512_BF16 or AMX"
    if precision == "int8":
        have = [flag for flag in INT8_DOT_FLAGS if flag in flags]
        return (
            "+".join(have) if have else "AVX2 16-bit pair sums, no VNNI" if "avx2" in flags else "no int8 dot product"
        )
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "scalar/SSE"


@torch.inference_mode()
def gemm_gflops(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a size² matrix product in torch in ``dtype`` (2·size³ operations), on torch's threads."""
    a = torch.randn(size, size).to(dtype)
    torch.mm(a, a)  # warm-up: the first product allocates
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    return repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9


@functools.cache
def _int8_product_session(size: int, threads: int):
    """An ONNX Runtime session of one uint8 × int8 → int32 product (MatMulInteger), its weights a
    size² int8 initializer: the kernel the int8 engines' products run on."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).integers(-64, 65, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8_product",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [numpy_helper.from_array(weights, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def int8_gops(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    """G operations/s of a size² uint8 × int8 product in ONNX Runtime (2·size³), on torch's threads."""
    session = _int8_product_session(size, torch.get_num_threads())
    a = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
    session.run(None, {"a": a})  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"a": a})
    return repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9


def precision_rates() -> dict:
    """One measurement of each precision's product rate here (G operations/s): fp32, bf16 (emulated
    on a smaller product where the CPU lacks it), and int8 where ONNX Runtime is installed."""
    import importlib.util

    rates = {"fp32": gemm_gflops()}
    if cpu_has_bf16():
        rates["bf16"] = gemm_gflops(dtype=torch.bfloat16)
    else:
        rates["bf16"] = gemm_gflops(EMULATED_GEMM_SIZE, 1, torch.bfloat16)
    if importlib.util.find_spec("onnxruntime") is not None:
        rates["int8"] = int8_gops()
    return rates


def vit_macs_per_image(backbone) -> int:
    """Multiply-accumulates of the image tower on one image's 21 crops, counted from its shape:
    patch embedding, then per block the q/k/v and output projections, the attention's two
    products and the MLP, then the final projection (norms and activations are not products)."""
    visual = backbone.model.visual
    if not all(hasattr(visual, name) for name in ("conv1", "grid_size", "transformer")):
        raise UserError(f"the GEMM floor is counted for ViT image towers; {backbone.name} has {type(visual).__name__}")
    patches = visual.grid_size[0] * visual.grid_size[1]
    tokens = patches + (1 if getattr(visual, "class_embedding", None) is not None else 0)
    width = visual.transformer.width
    kernel = visual.conv1.kernel_size
    macs = patches * width * visual.conv1.in_channels * kernel[0] * kernel[1]
    for block in visual.transformer.resblocks:
        mlp_width = block.mlp.c_fc.out_features
        macs += tokens * (4 * width * width + 2 * width * mlp_width) + 2 * tokens * tokens * width
    if getattr(visual, "proj", None) is not None:
        macs += visual.proj.shape[0] * visual.proj.shape[1]
    return N_CROPS * macs


def time_rounds(times: EngineTimes, per_image: dict, rounds: int) -> EngineTimes:
    """Fill ``times``: each round measures the precisions' product rates, then calls every
    ``per_image[engine]()`` once (each returns its seconds per image)."""
    for _ in range(rounds):
        for precision, rate in precision_rates().items():
            times.rates.setdefault(precision, []).append(rate)
            times.hardware[precision] = hardware_of(precision)
        for engine, measure in per_image.items():
            times.seconds.setdefault(engine, []).append(measure())
    return times


def compare_encoders(backbones: dict, *, size: int, rounds: int) -> EngineTimes:
    """Seconds per image of each backbone's ``encode_images`` on one synthetic image's 21 crops."""
    import tempfile

    from raml.extract.bench import synthetic_images
    from raml.extract.pyramid import load_rgb, pyramid_pixels

    first = next(iter(backbones.values()))
    with tempfile.TemporaryDirectory(prefix="raml-bench-") as tmp:
        crops = pyramid_pixels(
            load_rgb(synthetic_images(Path(tmp), 1, size)[0]), first.input_size, first.mean, first.std
        )

    def measure(backbone):
        start = time.perf_counter()
        backbone.encode_images(crops)
        return time.perf_counter() - start

    for backbone in backbones.values():
        backbone.encode_images(crops)  # warm-up
    times = EngineTimes(
        what=f"bench extract, encoder per image ({N_CROPS} crops of a {size} px image)",
        model=model_label(first),
        macs_per_image=vit_macs_per_image(first),
    )
    return time_rounds(
        times, {engine: (lambda b=backbone: measure(b)) for engine, backbone in backbones.items()}, rounds
    )


def model_label(backbone) -> str:
    return (
        f"{backbone.name} ({backbone.weights}{', meaningless weights: speed only' if backbone.random_weights else ''})"
    )
