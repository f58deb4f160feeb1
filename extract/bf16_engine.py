"""The bfloat16 torch engine for CPUs with bf16 arithmetic (``--engine torch-bf16``).

The image tower's weights are cast to bfloat16 (a copy: the fp32 model stays for the prompts, the
ONNX export and the reference), and the crops with them; oneDNN then runs the products on AMX tiles
or AVX512_BF16 instructions, with float32 sums. Measured outside the project on a Xeon with AMX:
ViT-B/16 encoded one image's 21 crops in 0.84 s against 4.48 s in fp32 torch, per-crop cosine to
fp32 0.99995. ``torch.autocast`` was slower there (6.7 s): casting at every layer costs more than it
saves, so the weights are cast once.

A CPU without bf16 arithmetic emulates it, slower than fp32, so the engine refuses such a CPU
(``extract.engines.engine_problem``). Its features pass the same fidelity gate as int8
(extract/fidelity.py) before they are used, and a cache records their precision, ``bf16``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from raml.errors import UserError
from raml.extract.encoder import ClipBackbone
from raml.extract.engines import BF16_PRECISION, cpu_model, engine_problem, say
from raml.extract.onnx_engine import torch_fields

ENGINE = "torch-bf16"


@dataclass(kw_only=True)
class Bf16ClipBackbone(ClipBackbone):
    """A ``ClipBackbone`` whose image tower runs in bfloat16, beside the fp32 one it is checked against."""

    reference: ClipBackbone  # the same model in fp32: what the fidelity gate compares with
    engine: str = ENGINE
    precision: str = BF16_PRECISION

    def reference_encode(self, pixels: np.ndarray) -> np.ndarray:
        """The fp32 embeddings of ``pixels`` that the fidelity gate compares ``encode_images``' with."""
        return self.reference.encode_images(pixels)

    @property
    def fidelity_key(self) -> str:
        """What a fidelity check is recorded under: what the bf16 features depend on (the weights, the
        model's config, torch's kernels and the CPU's instructions)."""
        facts = [ENGINE, self.model_config, self.weights, torch.__version__, cpu_model()]
        return f"{ENGINE}:{hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]}"


def bf16_backbone(backbone: ClipBackbone, *, check_cpu: bool = True) -> Bf16ClipBackbone:
    """``backbone`` with its image tower run in bfloat16 on the CPU. Raises ``UserError`` where the
    CPU has no bf16 arithmetic (``check_cpu=False`` skips that check: tests run it emulated)."""
    problem = engine_problem(ENGINE, backbone.device.type) if check_cpu else None
    if problem is None and backbone.device.type != "cpu":
        problem = f"--engine {ENGINE} runs on the CPU, not on --device {backbone.device}"
    if problem:
        raise UserError(problem)
    say(f"{ENGINE}: the image tower in bfloat16 on {cpu_model()}, {torch.get_num_threads()} threads")
    return Bf16ClipBackbone(**{**torch_fields(backbone), "image_dtype": torch.bfloat16}, reference=backbone)
