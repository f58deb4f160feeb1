"""``bench extract``: where stage one's time goes, on synthetic images of MVTec's size.

On the same images, in one run:

- **whole stage**: ``extract_features`` end to end (decode, crop, hand-over, encode, write),
  less its one-off prompt encoding, which is timed apart: it is ~50 text forwards per category
  whatever the number of images, so counting it would make the figure depend on ``--images``;
- **loader alone**: the loader of ``extract`` (``extract.loader.CropBatches``: worker processes,
  hand-over, batches staged on the encoder's device) with no encoder behind it;
- **bare encoder**: ``encode_crops`` on crops already on the device, in the stage's batch sizes.
  Its speed does not depend on the pixels, so it encodes the first batch's crops again and again
  (memory stays one batch whatever ``--images``);
- the loader's **ceiling**: ``min(workers, usable cores)`` ÷ the time one process takes to decode
  and crop one image (``load_rgb`` + ``pyramid_crops``, median of a few images).

The stage is as fast as it can be when its time is that of the slower of loader and encoder;
``overhead`` = stage time ÷ bare-encoder time. With ``patch_tokens`` (``--patch-tokens``), half of
the images are anomalous with a mask, and the whole stage is also timed with patch tokens and mask
targets, interleaved with the stage without them, ``rounds`` times each on fresh caches, with the
prompts encoded once for all of them (``PromptsOnce``: the two stages then differ by the tokens
alone): the median of the ratios is the tokens' overhead, in wall time and in CPU time (this
process and its decoding workers; other jobs on a shared machine move it far less than the wall
time), and the caches' sizes give the bytes per image. On CUDA it also checks the fp16 image tower against
fp32 CPU features, crop by crop (``FP16_MIN_COSINE``). ``--loader-only`` measures the loader and
its ceiling alone. The CPU time of the loader (workers, and this process) is reported as well: on
a shared machine the rates drop, the CPU time per image much less.
"""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raml.cache import N_CROPS
from raml.cache.format import shards_bytes
from raml.extract.config import ExtractConfig
from raml.extract.datasets import read_dataset
from raml.extract.encoder import FP16_MIN_COSINE, ClipBackbone
from raml.extract.engines import usable_cores
from raml.extract.loader import CropBatches
from raml.extract.plan import batch_indices
from raml.extract.prompts import prompts_for
from raml.extract.pyramid import load_rgb, pyramid_crops
from raml.extract.run import extract_features

DISTINCT_SYNTHETIC_IMAGES = 32  # drawn and saved; the other synthetic images are links to these
DECODE_TIMING_IMAGES = 5  # images decoded and cropped one by one for the loader's ceiling
COSINE_CHECK_IMAGES = 4  # images whose crops are encoded again in fp32 on the CPU (CUDA only)


@dataclass
class ExtractBench:
    """What ``bench extract`` measured; ``lines()`` is what it prints."""

    model: str
    engine: str
    device: str
    images: int
    size: int
    batch_size: int
    workers: int
    cores: int
    loader_seconds: float  # the loader alone, worker start-up included (as in the stage)
    decode_crop_seconds: float  # one image decoded and cropped, in one process (median)
    loader_cpu_seconds: tuple  # CPU time of the loader-alone run: (workers, this process)
    encoder_seconds: float | None = None  # encode_crops alone; None with --loader-only
    stage_seconds: float | None = None  # extract_features end to end, less the prompt encoding
    prompt_seconds: float | None = None  # the one-off prompt encoding of the bench's one category
    min_cosine: float | None = None  # fp16 on CUDA vs fp32 on the CPU, worst crop; None off CUDA
    token_rounds: list | None = None  # --patch-tokens: per round, (wall, CPU) seconds without and with tokens
    cache_bytes: tuple | None = None  # --patch-tokens: the shards' bytes (without, with tokens)

    def rate(self, seconds: float) -> float:
        return self.images / seconds

    @property
    def loader_ceiling(self) -> float:
        """Images/s if every worker decoded and cropped all the time, with a core of its own."""
        return max(1, min(self.workers, self.cores)) / self.decode_crop_seconds

    def lines(self) -> list[str]:
        loader = self.rate(self.loader_seconds)
        lines = [
            f"bench extract: {self.model}, engine {self.engine}, on {self.device}; {self.images} images of "
            f"{self.size} px, batch {self.batch_size}, {self.workers} workers, {self.cores} usable cores"
        ]
        if self.stage_seconds is not None:
            lines.append(
                f"  whole stage   {self.rate(self.stage_seconds):9.2f} images/s  ({self.stage_seconds:.1f} s; "
                f"the one-off prompt encoding, {self.prompt_seconds:.1f} s, not counted)"
            )
        lines += [
            f"  loader alone  {loader:9.2f} images/s  = {loader / self.loader_ceiling:.2f} x its ceiling of "
            f"{self.loader_ceiling:.2f} images/s ({max(1, min(self.workers, self.cores))} decoding at "
            f"{1000 * self.decode_crop_seconds:.1f} ms per image)",
            f"  loader CPU per image: {1000 * self.loader_cpu_seconds[0] / self.images:.1f} ms in the workers, "
            f"{1000 * self.loader_cpu_seconds[1] / self.images:.1f} ms in this process (a shared machine slows "
            "the rates, not these)",
        ]
        if self.encoder_seconds is not None:
            encoder = self.rate(self.encoder_seconds)
            lines += [
                f"  bare encoder  {encoder:9.2f} images/s  ({self.encoder_seconds:.1f} s)",
                f"  stage time / bare encoder time: x{self.stage_seconds / self.encoder_seconds:.3f} "
                f"(overhead); loader rate / encoder rate: x{loader / encoder:.2f} (below 1, the loader sets "
                "the pace)",
            ]
        if self.token_rounds:
            without, with_tokens = (self.cache_bytes[0] / self.images, self.cache_bytes[1] / self.images)
            for k, what in enumerate(("wall time", "CPU time")):
                ratios = [with_tokens_[k] / without_[k] for without_, with_tokens_ in self.token_rounds]
                lines.append(
                    f"  with patch tokens: whole stage x{statistics.median(ratios):.3f} of the stage without "
                    f"them in {what} (median of {len(ratios)} interleaved rounds: "
                    + ", ".join(f"x{r:.3f}" for r in ratios)
                    + ")"
                )
            lines += [
                f"  cache per image: {without / 1e6:.3f} MB without tokens, {with_tokens / 1e6:.3f} MB with "
                f"(tokens and mask targets: {(with_tokens - without) / 1e6:.3f} MB)"
            ]
        if self.min_cosine is not None:
            verdict = "ok" if self.min_cosine >= FP16_MIN_COSINE else "TOO FAR"
            lines.append(
                f"  {self.device} features vs fp32 CPU features: worst crop cosine {self.min_cosine:.6f} "
                f"(must be >= {FP16_MIN_COSINE}): {verdict}"
            )
        return lines


def synthetic_images(folder: Path, count: int, size: int, seed: int = 0, masks: bool = False) -> list[Path]:
    """``count`` textured RGB PNGs of ``size`` px in a one-category folder dataset.

    ``DISTINCT_SYNTHETIC_IMAGES`` of them are drawn and saved in parallel (saving a noisy 900-px PNG
    takes ~0.1 s); the others are hard links to them (copies where links are not possible):
    decoding and cropping take as long whichever image it is, and ``--images 1000`` starts at once.
    With ``masks``, every second image is in ``defect/`` with a defect mask (a square) in
    ``masks/defect/``, as the folder layout keeps them.
    """
    base = folder / "bench"
    folders = [base / "good", base / "defect"] if masks else [base / "good"]
    for sub in folders + ([base / "masks" / "defect"] if masks else []):
        sub.mkdir(parents=True)
    paths = [folders[i % len(folders)] / f"{i:05d}.png" for i in range(count)]
    distinct = paths[:DISTINCT_SYNTHETIC_IMAGES]
    with ProcessPoolExecutor(min(usable_cores(), max(len(distinct), 1))) as pool:
        list(
            pool.map(
                _save_synthetic_image, distinct, range(len(distinct)), [size] * len(distinct), [seed] * len(distinct)
            )
        )
    for i, path in enumerate(paths[len(distinct) :], start=len(distinct)):
        _link(distinct[i % len(distinct)], path)
    if masks:
        square = np.zeros((size, size), np.uint8)
        square[size // 3 : size // 2, size // 3 : size // 2] = 255
        defective = [path for path in paths if path.parent.name == "defect"]
        for i, path in enumerate(defective):
            mask = base / "masks" / "defect" / path.name
            Image.fromarray(square).save(mask) if i == 0 else _link(base / "masks" / "defect" / defective[0].name, mask)
    return paths


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy where links are not possible)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _save_synthetic_image(path: Path, index: int, size: int, seed: int) -> None:
    """Smooth stripes that differ per image, plus sensor-like noise, as PNG decoding meets in MVTec."""
    rng = np.random.default_rng([seed, index])
    axis = np.arange(size, dtype=np.float32) / size
    base = np.stack([np.outer(np.cos(axis * (5 + c)), np.sin(axis * (3 + c + index))) for c in range(3)], axis=-1)
    noise = rng.integers(-12, 13, base.shape, dtype=np.int16)
    Image.fromarray(np.clip(127 + (100 * base).astype(np.int16) + noise, 0, 255).astype(np.uint8)).save(path)


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds so far of the finished child processes (0 on Windows) and of this process."""
    times = os.times()
    return times.children_user + times.children_system, times.user + times.system


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_image_seconds(paths: list[Path], size: int) -> float:
    """Median time of ``load_rgb`` + ``pyramid_crops`` for one image, in this process."""
    pyramid_crops(load_rgb(paths[0]), size)  # warm-up: first-call imports and allocations
    times = []
    for path in paths[:DECODE_TIMING_IMAGES]:
        start = time.perf_counter()
        pyramid_crops(load_rgb(path), size)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fp32_cpu_reference(backbone: ClipBackbone) -> ClipBackbone:
    """A torch copy of ``backbone`` that runs its image tower in fp32 on the CPU."""
    same = {f.name: getattr(backbone, f.name) for f in fields(ClipBackbone)}
    return ClipBackbone(
        **{
            **same,
            "model": copy.deepcopy(backbone.model).float().cpu(),
            "device": torch.device("cpu"),
            "engine": "torch",
            "image_dtype": torch.float32,
        }
    )


def min_crop_cosine(backbone: ClipBackbone, crops: torch.Tensor) -> float:
    """The lowest cosine, over ``crops``, between ``backbone``'s features and fp32 CPU ones."""
    ours = backbone.encode_crops(crops)
    reference = fp32_cpu_reference(backbone).encode_crops(crops.cpu())
    return float((ours * reference).sum(axis=1).min())  # both are L2-normalised


def run_extract_bench(
    backbone,
    *,
    images: int,
    size: int,
    batch_size: int,
    workers: int,
    loader_only: bool = False,
    patch_tokens: bool = False,
    rounds: int = 3,
) -> ExtractBench:
    """Measure stage one on ``images`` synthetic PNGs of ``size`` px (see the module docstring);
    ``loader_only``: the loader and its ceiling alone (ViT-B/16 on a CPU takes ~2 s per image);
    ``patch_tokens``: also the stage with patch tokens against the stage without, ``rounds`` times."""
    with tempfile.TemporaryDirectory(prefix="raml-bench-") as tmp:
        data = Path(tmp) / "data"
        paths = synthetic_images(data, images, size, masks=patch_tokens)
        result = ExtractBench(
            model=backbone.name,
            engine=backbone.engine,
            device=str(backbone.device),
            images=images,
            size=size,
            batch_size=batch_size,
            workers=workers,
            cores=usable_cores(),
            decode_crop_seconds=one_image_seconds(paths, backbone.input_size),
            loader_seconds=0.0,
            loader_cpu_seconds=(0.0, 0.0),
        )
        batches = batch_indices([images], batch_size)  # extract's batches: its shards hold whole batches
        first = _time_loader(result, backbone, data, batches)
        if loader_only:
            return result
        result.encoder_seconds = _time_encoder(backbone, first, batches)
        # The prompts are encoded once, here, and timed apart: the stages below reuse them (a time
        # measured apart and subtracted could come out negative on a busy machine).
        once = PromptsOnce(backbone)
        start = time.perf_counter()
        for prompts in prompts_for("bench").values():
            once.encode_texts(prompts)
        _sync(backbone.device)
        result.prompt_seconds = time.perf_counter() - start

        def stage(cache: Path, tokens: bool = False):
            """(wall, CPU) seconds of the whole stage into ``cache``, the prompts already encoded."""
            cpu, start = sum(_cpu_seconds()), time.perf_counter()
            config = ExtractConfig(batch_size=batch_size, workers=workers, patch_tokens=tokens)
            extract_features("folder", data, cache, lambda: once, config, progress=False)
            _sync(backbone.device)
            return time.perf_counter() - start, sum(_cpu_seconds()) - cpu

        result.stage_seconds = stage(Path(tmp) / "cache")[0]
        if patch_tokens:
            stage(Path(tmp) / "warm-up", True)  # the tokens' first-call allocations
            result.token_rounds = [
                (stage(Path(tmp) / f"plain-{r}"), stage(Path(tmp) / f"tokens-{r}", True)) for r in range(rounds)
            ]
            result.cache_bytes = tuple(shards_bytes(Path(tmp) / f"{kind}-0") for kind in ("plain", "tokens"))
        if backbone.device.type == "cuda":
            result.min_cosine = min_crop_cosine(backbone, first[: COSINE_CHECK_IMAGES * N_CROPS])
    return result


class PromptsOnce:
    """A backbone whose prompt embeddings are computed once and reused: stages timed against each
    other then differ by what they do with the images alone."""

    def __init__(self, backbone):
        self._backbone, self._texts = backbone, {}

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if tuple(texts) not in self._texts:
            self._texts[tuple(texts)] = self._backbone.encode_texts(texts)
        return self._texts[tuple(texts)]


def _time_loader(result: ExtractBench, backbone, data: Path, batches: list) -> torch.Tensor:
    """Run extract's loader alone over ``data`` into ``result``; return the first batch's crops."""
    root, records = read_dataset("folder", data)
    device, first = backbone.crops_device, None
    cpu, start = _cpu_seconds(), time.perf_counter()
    with CropBatches(root, records, batches, backbone.input_size, workers=result.workers, device=device) as loader:
        for batch in loader:
            first = batch.crops if first is None else first
    _sync(device)
    result.loader_seconds = time.perf_counter() - start
    result.loader_cpu_seconds = tuple(after - before for after, before in zip(_cpu_seconds(), cpu))
    return first


def _time_encoder(backbone, crops: torch.Tensor, batches: list) -> float:
    """Seconds of ``encode_crops`` in the sizes of ``batches``, on ``crops`` (one batch, reused)."""
    backbone.encode_crops(crops)  # warm-up: first-call allocations (and the fp16 copy) are not the stage's
    backbone.encode_texts(["warm-up"])
    start = time.perf_counter()
    for batch in batches:
        backbone.encode_crops(crops[: len(batch) * N_CROPS])
    _sync(backbone.device)
    return time.perf_counter() - start
