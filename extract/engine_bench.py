"""The image-encoder engines side by side on this machine, against its fp32 GEMM floor.

``bench extract`` times the encoder alone (one image's 21 crops); ``bench predict``
(evaluate/deploy/bench.py) times a whole prediction. Both report seconds per image for each engine and
its ratio to the machine's floor, so that figures from different machines can be compared::

    floor = multiply-accumulates of one image's 21 crops (``vit_macs_per_image``; ViT-B/16: 369 G,
            the speed target's "370 GFLOP per image")
            ÷ the FLOP/s of a 2048² fp32 matrix product in torch, on the same threads

The floor keeps the speed target's definition, in which one multiply-accumulate is set against one
floating-point operation of the GEMM although it costs two: an fp32 engine running every product
at the GEMM's speed would take 2× the floor, and only integer kernels (int8 dot-product
instructions such as AVX-512 VNNI) can go below it.

Rounds interleave the engines: each round measures the GEMM and every engine once, and the
figures are medians over rounds, so that load coming and going on a shared machine hits every
engine alike.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raml.cache import N_CROPS
from raml.errors import UserError

GEMM_SIZE = 2048  # large enough to run at the machine's fp32 peak, small enough to take ~0.1 s
GEMM_REPEATS = 3  # products per GEMM measurement


@dataclass
class EngineTimes:
    """Seconds per image of each engine, one figure per round, and the GEMM rate of each round."""

    what: str  # what one "image" costs here, e.g. "encoder, 21 crops"
    model: str
    macs_per_image: float
    gemm_gflops: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # engine → [seconds per image, one per round]
    reference: str | None = None  # an engine that is not ours (e.g. WinCLIP): ratios to it

    def median(self, engine: str) -> float:
        return statistics.median(self.seconds[engine])

    @property
    def floor_seconds(self) -> float:
        return self.macs_per_image / (statistics.median(self.gemm_gflops) * 1e9)

    def lines(self) -> list[str]:
        gemm = statistics.median(self.gemm_gflops)
        lines = [
            f"{self.what}: {self.model}; CPU {cpu_model()}, {torch.get_num_threads()} threads; median of "
            f"{len(self.gemm_gflops)} rounds (engines interleaved)",
            f"  fp32 GEMM floor: {self.macs_per_image / 1e9:.1f} G multiply-accumulates per image / "
            f"{gemm:.0f} GFLOP/s ({GEMM_SIZE}² matmul, {min(self.gemm_gflops):.0f}-{max(self.gemm_gflops):.0f}) "
            f"= {self.floor_seconds:.2f} s",
        ]
        for engine, times in self.seconds.items():
            line = f"  {engine:<10} {self.median(engine):7.2f} s/image ({min(times):.2f}-{max(times):.2f})"
            if engine != self.reference:  # the floor is our model's; the reference runs another one
                line += f"  {self.median(engine) / self.floor_seconds:5.2f} × floor"
                if self.reference:
                    line += f"  {self.median(engine) / self.median(self.reference):5.2f} × {self.reference}"
            lines.append(line)
        return lines


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` shows it, with its vector extensions (Linux), e.g.
    "AMD EPYC (AVX-512, VNNI)"; else what Python's platform module knows. The extensions matter:
    the same model name comes with and without AVX-512, and int8 kernels differ with VNNI."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    extensions = [label for label, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2")) if flag in flags][:1]
    extensions += ["VNNI"] if flags & {"avx512_vnni", "avx_vnni"} else ["no VNNI"] if extensions else []
    return f"{name} ({', '.join(extensions)})" if extensions else name


@torch.inference_mode()
def gemm_gflops(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    """GFLOP/s of a size² fp32 matrix product in torch (2·size³ operations), on torch's threads."""
    a = torch.randn(size, size)
    torch.mm(a, a)  # warm-up: the first product allocates
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    return repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9


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
    """Fill ``times``: each round measures the GEMM, then calls every ``per_image[engine]()`` once
    (each returns its seconds per image)."""
    for _ in range(rounds):
        times.gemm_gflops.append(gemm_gflops())
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
