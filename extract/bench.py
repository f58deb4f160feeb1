"""``bench extract``: images/s of stage one and its overhead over the bare encoder.

overhead = (decode + crop + encode + write, i.e. ``extract_features`` end to end)
           / (the encoder's forward passes alone on the same crops, in the same batches)
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extract.pyramid import load_rgb, pyramid_pixels
from extract.run import extract_features


@dataclass
class ExtractBench:
    images: int
    device: str
    model: str
    stage_seconds: float
    encoder_seconds: float

    def line(self) -> str:
        return (f"bench extract: {self.model} on {self.device}, {self.images} images: "
                f"stage {self.images / self.stage_seconds:.2f} images/s ({self.stage_seconds:.1f} s), "
                f"bare encoder {self.images / self.encoder_seconds:.2f} images/s ({self.encoder_seconds:.1f} s), "
                f"overhead ×{self.stage_seconds / self.encoder_seconds:.3f}")


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

        _sync(backbone.device)
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
    return ExtractBench(images=images, device=str(backbone.device), model=backbone.name,
                        stage_seconds=stage_seconds, encoder_seconds=encoder_seconds)
