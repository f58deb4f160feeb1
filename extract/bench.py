"""``bench extract``: images/s of stage one and its overhead over the bare encoder.

overhead = (decode + crop + encode + write, i.e. ``extract_features`` end to end,
            less its one-off prompt encoding, timed separately and reported)
           / (the encoder's forward passes alone on the same crops, in the same batches)

The prompts are encoded once per category whatever the number of images (~50 text forwards), so
counting them would make the figure depend on how many images the bench uses.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extract.prompts import prompts_for
from extract.pyramid import load_rgb, pyramid_pixels
from extract.run import extract_features


@dataclass
class ExtractBench:
    images: int
    device: str
    model: str
    engine: str
    stage_seconds: float      # extract_features end to end, prompts included
    prompt_seconds: float     # the one-off prompt encoding of the bench's one category
    encoder_seconds: float

    def line(self) -> str:
        images_seconds = self.stage_seconds - self.prompt_seconds
        return (f"bench extract: {self.model}, engine {self.engine}, on {self.device}, {self.images} images: "
                f"stage {self.images / images_seconds:.2f} images/s ({images_seconds:.1f} s + "
                f"{self.prompt_seconds:.1f} s one-off prompt encoding), "
                f"bare encoder {self.images / self.encoder_seconds:.2f} images/s ({self.encoder_seconds:.1f} s), "
                f"overhead ×{images_seconds / self.encoder_seconds:.3f}")


def synthetic_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` textured RGB PNGs of ``size`` px in a one-category folder dataset."""
    rng = np.random.default_rng(seed)
    good = folder / "bench" / "good"
    good.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        base = np.stack([np.sin(xx * (3 + c + i)) * np.cos(yy * (5 + c)) for c in range(3)], axis=-1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = good / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_extract_bench(backbone, *, images: int, size: int, batch_size: int, workers: int) -> ExtractBench:
    with tempfile.TemporaryDirectory(prefix="raml-bench-") as tmp:
        tmp = Path(tmp)
        paths = synthetic_images(tmp / "data", images, size)
        crops = [pyramid_pixels(load_rgb(p), backbone.input_size, backbone.mean, backbone.std) for p in paths]
        backbone.encode_images(crops[0])  # warm-up: first-call allocations are not the stage's cost
        backbone.encode_texts(["warm-up"])

        start = time.perf_counter()
        for prompts in prompts_for("bench").values():
            backbone.encode_texts(prompts)
        _sync(backbone.device)
        prompt_seconds = time.perf_counter() - start

        start = time.perf_counter()
        for i in range(0, images, batch_size):
            backbone.encode_images(np.concatenate(crops[i:i + batch_size]))
        _sync(backbone.device)
        encoder_seconds = time.perf_counter() - start

        start = time.perf_counter()
        extract_features("folder", tmp / "data", tmp / "cache", lambda: backbone, batch_size=batch_size,
                         workers=workers, progress=False)
        _sync(backbone.device)
        stage_seconds = time.perf_counter() - start
    return ExtractBench(images=images, device=str(backbone.device), model=backbone.name, engine=backbone.engine,
                        stage_seconds=stage_seconds, prompt_seconds=prompt_seconds,
                        encoder_seconds=encoder_seconds)
