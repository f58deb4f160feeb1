"""``bench train``: time stage two on a synthetic cache of MVTec AD's real shape.

5,354 images × 21 crops × 512 float16 features in 15 categories with MVTec's train/test and
normal/defective counts (``synthetic.MVTEC_SHAPE``), written as real shards and read back. The
features are made up: the bench times the training, its accuracy means nothing.

With ``--sweep`` it also times the margins × seeds (× ``--lrs``) sweep two ways on the same cache:
the batched pass (``fit_runs``: every run in one stacked model, as ``sweep`` trains them) and the
old path, one ``fit`` per run in ``jobs`` worker processes of ``threads`` threads, and prints their
ratio; then the training part of the ``sweep`` command (``train.sweep.train_missing``: batched
training and writing the runs; scoring them is evaluate's and is not timed here). The batched pass
and the sweep get the same cores as the old path: one process of ``jobs × threads`` threads.
Targets (2-core CPU): 25 epochs ≤ 30 s; the 3 × 5 sweep ≤ 120 s; 45 runs ≤ 6 min; memory ≤ 2 GB.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from joblib import Parallel, delayed

from raml.cache import read_cache
from raml.cache.synthetic import MVTEC_SHAPE, write_synthetic_cache
from raml.extract.encoder import resolve_device
from raml.train.config import MARGIN_PRESETS, make_config
from raml.train.fit import fit, fit_runs
from raml.train.sweep import build_configs, grid_configurations, peak_memory_mb, train_missing

TARGETS = {"train_seconds": 30.0, "sweep_seconds": 120.0, "memory_mb": 2048.0}


@dataclass
class TrainBench:
    images: int
    training_images: int
    epochs: int
    steps_per_epoch: int
    read_seconds: float
    train_seconds: float  # the epochs alone
    fit_seconds: float  # all of ``fit``: tensors, init, epochs, threshold
    memory_mb: float  # peak resident memory of this process
    threads: int
    device: str
    sweep: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        steps = self.epochs * self.steps_per_epoch
        lines = [
            f"bench train: {self.images} images × 21 × 512 float16, 15 categories; "
            f"{self.training_images} training images, torch threads {self.threads}, device {self.device}",
            f"  read cache            {self.read_seconds:7.1f} s",
            f"  {self.epochs} epochs × {self.steps_per_epoch} steps  {self.train_seconds:7.1f} s  "
            f"({1000 * self.train_seconds / steps:.2f} ms/step; target ≤ {TARGETS['train_seconds']:.0f} s)",
            f"  whole fit             {self.fit_seconds:7.1f} s",
            f"  peak memory           {self.memory_mb:7.0f} MB (target ≤ {TARGETS['memory_mb']:.0f} MB)",
        ]
        if self.sweep:
            s = self.sweep
            lines += [
                f"  sweep of {s['runs']} runs ({s['grid']}), {self.epochs} epochs each:",
                f"    batched, one pass      {s['batched_seconds']:7.1f} s of training, {s['pass_threads']} threads "
                f"({1000 * s['batched_seconds'] / steps:.1f} ms/step for all runs); "
                f"peak memory {s['batched_memory_mb']:.0f} MB",
            ]
            if s.get("separate_seconds") is not None:
                lines.append(
                    f"    one run at a time      {s['separate_seconds']:7.1f} s ({s['jobs']} worker processes × {self.threads} threads); "
                    f"batched is ×{s['separate_seconds'] / s['batched_seconds']:.2f} faster"
                )
            lines.append(
                f"    sweep's training       {s['sweep_seconds']:7.1f} s (batched training + writing the runs, "
                f"as sweep does them; target for 15 runs ≤ {TARGETS['sweep_seconds']:.0f} s)"
            )
        return lines


def run_train_bench(
    epochs: int = 25,
    sweep: bool = False,
    seeds: int = 5,
    lrs=None,
    jobs: int = 2,
    threads: int = 1,
    device: str = "cpu",
    separate: bool = True,
) -> TrainBench:
    """Build the synthetic cache in a temporary folder, time ``fit`` (and optionally the sweep)."""
    with tempfile.TemporaryDirectory(prefix="raml-bench-train-") as tmp:
        cache_dir = write_synthetic_cache(Path(tmp) / "cache", MVTEC_SHAPE)
        start = time.perf_counter()
        table = read_cache(cache_dir)
        read_seconds = time.perf_counter() - start
        config = make_config("adaptive", epochs=epochs)
        start = time.perf_counter()
        trained = fit(table, config, threads=threads, device=device)
        fit_seconds = time.perf_counter() - start
        result = TrainBench(
            images=len(table),
            training_images=len(trained.split.train),
            epochs=epochs,
            steps_per_epoch=len(trained.split.train) // config.batch_size,
            read_seconds=read_seconds,
            train_seconds=sum(record["seconds"] for record in trained.history),
            fit_seconds=fit_seconds,
            memory_mb=peak_memory_mb(),
            threads=threads,
            device=str(resolve_device(device)),
        )
        del trained
        if sweep:
            result.sweep = _sweep_bench(table, Path(tmp), epochs, seeds, lrs, jobs, threads, device, separate)
    return result


def _sweep_bench(table, tmp: Path, epochs, seeds, lrs, jobs, threads, device, separate) -> dict:
    vary = {"lr": list(lrs)} if lrs else None
    configurations = grid_configurations(list(MARGIN_PRESETS), vary, epochs=epochs)
    configs = [config for _, config in build_configs(configurations, range(seeds)).values()]
    grid = f"{len(MARGIN_PRESETS)} margins × {seeds} seeds" + (f" × {len(lrs)} learning rates" if lrs else "")
    pass_threads = jobs * threads  # the cores that the old path's worker processes use
    start = time.perf_counter()
    fit_runs(table, configs, threads=pass_threads, device=device)
    result = {
        "runs": len(configs),
        "grid": grid,
        "jobs": jobs,
        "pass_threads": pass_threads,
        "batched_seconds": time.perf_counter() - start,
        "batched_memory_mb": peak_memory_mb(),
    }
    if separate:
        start = time.perf_counter()
        Parallel(n_jobs=jobs)(delayed(_train_alone)(table, config, threads, device) for config in configs)
        result["separate_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    train_missing(table, configurations, list(range(seeds)), tmp / "sweep", threads=pass_threads, device=device)
    result["sweep_seconds"] = time.perf_counter() - start
    return result


def _train_alone(table, config, threads, device) -> None:
    fit(table, config, threads=threads, device=device)
