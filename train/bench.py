"""``bench train``: stage two's training step against its arithmetic floor (``train.floor``), on a
synthetic cache of MVTec AD's real shape.

5,354 images × 21 crops × 512 float16 features in 15 categories with MVTec's train/test and
normal/defective counts (``synthetic.MVTEC_SHAPE``), written as real shards and read back. The
features are made up: the bench times the training, its accuracy means nothing.

It trains one run, then with ``--sweep`` the margins × seeds (× ``--lrs``) sweep as one batched pass
(``fit_runs``, as ``sweep`` trains it) and an ablation pass (``ABLATION_PASS`` over the same seeds,
as ``ablate`` trains it); for each: its FLOPs per step, the GEMM rate, its floor and its ratio to it
(wall and CPU time), and a step timed phase by phase. Then, as before, the old one-run-at-a-time
path (one ``fit`` per run in ``jobs`` worker processes of ``threads`` threads, ``--separate``) and
the training part of the ``sweep`` command (``train.sweep.train_missing``: batched training and
writing the runs). The batched passes get the cores the old path uses: ``jobs × threads`` threads.

Targets, as ratios to the floor on a 2-core CPU: one run ≤ 1.5 ×, the 15-run sweep ≤ 1.3 ×;
memory ≤ 2 GB. Compare ratios, not seconds: the floor moves with the machine and its load.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from joblib import Parallel, delayed

from raml.cache import read_cache
from raml.cache.synthetic import MVTEC_SHAPE, write_synthetic_cache
from raml.extract.encoder import resolve_device
from raml.extract.engine_bench import GEMM_SIZE, cpu_model
from raml.train.config import MARGIN_PRESETS, make_config
from raml.train.fit import batch_order, fit, fit_runs, prepare_pass, torch_threads
from raml.train.floor import BREAKDOWN_PHASES, FloorProbe, gemm_rates, products_alone, step_breakdown, step_flops
from raml.train.sweep import build_configs, grid_configurations, peak_memory_mb, train_missing

RATIO_TARGETS = {"one run": 1.5, "sweep": 1.3}  # step ÷ floor, 2-core CPU
MEMORY_TARGET_MB = 2048.0
BREAKDOWN_STEPS = 30  # steps timed phase by phase per pass
# The ablation pass: ``ablate``'s "original-loss" row (evaluate/ablate.py), the ablation whose step
# does the most besides the head's products (its difficulty tracker takes the batch image by image).
ABLATION_PASS = ("original-loss", {"loss_variant": "original"})


@dataclass
class PassBench:
    """One timed pass: ``train.floor.FloorProbe.summary``'s figures, its whole time and a phase breakdown."""

    name: str
    runs: int
    threads: int
    training_images: int
    steps_per_epoch: int
    seconds: float  # all of fit_runs: tensors, init, epochs, thresholds
    floor: dict
    breakdown: dict
    products_seconds: float  # ``products_alone``
    products_ratio: float  # against the floor at a GEMM rate sampled right after them
    memory_mb: float  # peak resident memory of this process so far
    target: float | None = None

    def lines(self, compiled: bool) -> list[str]:
        f = self.floor
        target = f"; target ≤ {self.target} ×" if self.target else ""
        lines = [
            f"  {self.name}: {self.runs} run{'s' * (self.runs > 1)}, {f['epochs']} epochs × {self.steps_per_epoch} "
            f"steps, {self.threads} thread{'s' * (self.threads > 1)}",
            f"    {f['flops'] / 1e9:.3f} GFLOP/step; GEMM {f['gemm_gflops']:.1f} GFLOP/s → floor "
            f"{1000 * f['floor_seconds']:.2f} ms; step {1000 * f['step_seconds']:.2f} ms = **{f['ratio']:.2f} × floor** "
            + (f"(CPU time: {f['cpu_ratio']:.2f} ×)" if f["cpu_ratio"] is not None else "(CPU time: needs 2 epochs)")
            + target,
            f"    whole pass {self.seconds:.1f} s; peak memory {self.memory_mb:.0f} MB (target ≤ {MEMORY_TARGET_MB:.0f} MB)"
            + (f"; compiling ≈ {f['first_epoch_excess']:.1f} s (the first epoch's excess)" if compiled else ""),
            f"    a step phase by phase (eager, median of {BREAKDOWN_STEPS}, ms): "
            + " · ".join(f"{phase} {1000 * self.breakdown[phase]:.2f}" for phase in BREAKDOWN_PHASES)
            + f" (sum {1000 * sum(v for k, v in self.breakdown.items() if k != 'state update'):.2f}; "
            "state update is part of loss)",
            f"    its matrix products alone, each at its own shapes: {1000 * self.products_seconds:.2f} ms = "
            f"{self.products_ratio:.2f} × floor (at a GEMM rate sampled with them)",
        ]
        return lines


@dataclass
class TrainBench:
    images: int
    training_images: int
    read_seconds: float
    cpu: str
    device: str
    compiled: bool
    passes: list = field(default_factory=list)
    old_path: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [
            f"bench train: {self.images} images × 21 × 512 float16, 15 categories; {self.training_images} training "
            f"images; {self.cpu}; device {self.device}; step {'compiled' if self.compiled else 'eager'}",
            f"  read cache {self.read_seconds:.1f} s",
            f"  floor = FLOPs of a step's matrix products (forward + backward, every run; FlopCounterMode) ÷ fp32 "
            f"GEMM rate ({GEMM_SIZE}², same threads, sampled after every epoch); medians over epochs",
        ]
        for bench in self.passes:
            lines += bench.lines(self.compiled)
        old = self.old_path
        if old.get("separate_seconds") is not None:
            batched = next(p for p in self.passes if p.name.startswith("sweep"))
            lines.append(
                f"  one run at a time: {old['separate_seconds']:.1f} s ({old['jobs']} worker processes × "
                f"{old['threads']} threads); the batched pass is ×{old['separate_seconds'] / batched.seconds:.2f} faster"
            )
        if old.get("sweep_seconds") is not None:
            lines.append(f"  sweep's training: {old['sweep_seconds']:.1f} s (batched training + writing the runs)")
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
    compile: bool = False,
) -> TrainBench:
    """Build the synthetic cache in a temporary folder and time the passes (see the module docstring)."""
    device = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="raml-bench-train-") as tmp:
        cache_dir = write_synthetic_cache(Path(tmp) / "cache", MVTEC_SHAPE)
        start = time.perf_counter()
        table = read_cache(cache_dir)
        read_seconds = time.perf_counter() - start
        one = _time_pass("one run", table, [make_config("adaptive", epochs=epochs)], threads, device, compile)
        result = TrainBench(
            images=len(table),
            training_images=one.training_images,
            read_seconds=read_seconds,
            cpu=cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
            device=str(device),
            compiled=compile,
            passes=[one],
        )
        if sweep:
            vary = {"lr": list(lrs)} if lrs else None
            configurations = grid_configurations(list(MARGIN_PRESETS), vary, epochs=epochs)
            configs = [config for _, config in build_configs(configurations, range(seeds)).values()]
            grid = f"{len(MARGIN_PRESETS)} margins × {seeds} seeds" + (f" × {len(lrs)} learning rates" if lrs else "")
            pass_threads = jobs * threads  # the cores that the old path's worker processes use
            result.passes.append(
                _time_pass(f"sweep ({grid}), one batched pass", table, configs, pass_threads, device, compile)
            )
            name, overrides = ABLATION_PASS
            ablation = [make_config("adaptive", epochs=epochs, seed=seed, **overrides) for seed in range(seeds)]
            result.passes.append(
                _time_pass(f"ablation pass ({name} × {seeds} seeds)", table, ablation, pass_threads, device, compile)
            )
            result.old_path = {"jobs": jobs, "threads": threads}
            if separate:
                start = time.perf_counter()
                Parallel(n_jobs=jobs)(
                    delayed(fit)(table, config, threads=threads, device=str(device), compile=compile)
                    for config in configs
                )
                result.old_path["separate_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            train_missing(
                table,
                configurations,
                list(range(seeds)),
                Path(tmp) / "sweep",
                threads=pass_threads,
                device=str(device),
                compile=compile,
            )
            result.old_path["sweep_seconds"] = time.perf_counter() - start
    return result


def _time_pass(name, table, configs, threads: int, device: torch.device, compile: bool) -> PassBench:
    """Train ``configs`` as one pass with a ``FloorProbe``, then count a step's FLOPs and time a step
    phase by phase on the same pass prepared afresh."""
    probe = FloorProbe(device)
    start = time.perf_counter()
    trained = fit_runs(table, configs, threads=threads, device=str(device), compile=compile, on_epoch=probe)
    seconds = time.perf_counter() - start
    memory = peak_memory_mb()
    split, batch_size = trained[0].split, configs[0].batch_size
    steps = len(split.train) // batch_size
    del trained
    with torch_threads(threads):
        step, state, _ = prepare_pass(table, configs, split, device)
        generators = [torch.Generator().manual_seed(config.seed) for config in configs]
        order = batch_order(generators, len(split.train), steps, batch_size, device)
        flops = step_flops(step, order[0], state)
        breakdown = step_breakdown(step, state, order[:BREAKDOWN_STEPS])
        products = products_alone(step, order[0], state)
        products_floor = flops / (gemm_rates(device)[0] * 1e9)
    return PassBench(
        name=name,
        runs=len(configs),
        threads=threads,
        training_images=len(split.train),
        steps_per_epoch=steps,
        seconds=seconds,
        floor=probe.summary(flops, steps, skip_first=compile),
        breakdown=breakdown,
        products_seconds=products,
        products_ratio=products / products_floor,
        memory_mb=memory,
        target=RATIO_TARGETS["one run"]
        if len(configs) == 1
        else RATIO_TARGETS["sweep"]
        if name.startswith("sweep")
        else None,
    )
