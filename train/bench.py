"""``bench train``: time stage two on a synthetic cache of MVTec AD's real shape.

5,354 images × 21 crops × 512 float16 features in 15 categories with MVTec's train/test and
normal/defective counts (``synthetic.MVTEC_SHAPE``), written as real shards and read back. The
features are made up: the bench times the training, its accuracy means nothing.
Targets (2-core CPU): 25 epochs ≤ 30 s, the 3 margins × 5 seeds sweep ≤ 8 min, peak memory ≤ 2 GB.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cache import read_cache
from train.config import MARGIN_PRESETS, make_config
from train.fit import fit
from train.sweep import METRICS_FILE, peak_memory_mb, run_sweep
from train.synthetic import MVTEC_SHAPE, write_synthetic_cache

TARGETS = {"train_seconds": 30.0, "sweep_seconds": 480.0, "memory_mb": 2048.0}


@dataclass
class TrainBench:
    images: int
    training_images: int
    epochs: int
    steps_per_epoch: int
    read_seconds: float
    train_seconds: float            # the epochs alone
    fit_seconds: float              # all of ``fit``: tensors, init, epochs, threshold
    memory_mb: float                # peak resident memory of this process
    threads: int
    sweep_runs: int = 0
    sweep_jobs: int = 0
    sweep_seconds: float | None = None
    sweep_memory_mb: float | None = None   # the largest peak of any process of the sweep

    def lines(self) -> list[str]:
        steps = self.epochs * self.steps_per_epoch
        lines = [f"bench train: {self.images} images × 21 × 512 float16, 15 categories; "
                 f"{self.training_images} training images, torch threads {self.threads}",
                 f"  read cache            {self.read_seconds:7.1f} s",
                 f"  {self.epochs} epochs × {self.steps_per_epoch} steps  {self.train_seconds:7.1f} s  "
                 f"({1000 * self.train_seconds / steps:.2f} ms/step; target ≤ {TARGETS['train_seconds']:.0f} s)",
                 f"  whole fit             {self.fit_seconds:7.1f} s",
                 f"  peak memory           {self.memory_mb:7.0f} MB (target ≤ {TARGETS['memory_mb']:.0f} MB)"]
        if self.sweep_seconds is not None:
            lines.append(f"  sweep {self.sweep_runs} runs, {self.sweep_jobs} jobs  {self.sweep_seconds:7.1f} s "
                         f"(target for 3 margins × 5 seeds ≤ {TARGETS['sweep_seconds']:.0f} s), "
                         f"largest peak memory of one process {self.sweep_memory_mb:.0f} MB")
        return lines


def run_train_bench(epochs: int = 25, sweep: bool = False, seeds: int = 5, jobs: int = 2,
                    threads: int = 1) -> TrainBench:
    """Build the synthetic cache in a temporary folder, time ``fit`` (and optionally the sweep)."""
    with tempfile.TemporaryDirectory(prefix="raml-bench-train-") as tmp:
        cache_dir = write_synthetic_cache(Path(tmp) / "cache", MVTEC_SHAPE)
        start = time.perf_counter()
        table = read_cache(cache_dir)
        read_seconds = time.perf_counter() - start
        config = make_config("adaptive", epochs=epochs)
        start = time.perf_counter()
        trained = fit(table, config, threads=threads)
        fit_seconds = time.perf_counter() - start
        result = TrainBench(images=len(table), training_images=len(trained.split.train), epochs=epochs,
                            steps_per_epoch=len(trained.split.train) // config.batch_size,
                            read_seconds=read_seconds,
                            train_seconds=sum(record["seconds"] for record in trained.history),
                            fit_seconds=fit_seconds, memory_mb=peak_memory_mb(), threads=threads)
        if sweep:
            del trained
            start = time.perf_counter()
            run_sweep(table, list(MARGIN_PRESETS), list(range(seeds)), Path(tmp) / "sweep", jobs=jobs,
                      threads=threads, epochs=epochs)
            result.sweep_seconds = time.perf_counter() - start
            result.sweep_runs, result.sweep_jobs = len(MARGIN_PRESETS) * seeds, jobs
            runs = [json.loads(path.read_text()) for path in (Path(tmp) / "sweep").glob(f"*/{METRICS_FILE}")]
            result.sweep_memory_mb = max([peak_memory_mb()] + [run["peak_memory_mb"] for run in runs])
    return result
