"""A training step against its arithmetic floor (``bench train``).

floor of a step = the FLOPs of its matrix products, forward and backward, of every run of the pass
                  ÷ the machine's fp32 GEMM rate (FLOP/s of a ``GEMM_SIZE``² product, on the same
                    threads and device, measured after every epoch of the timed training)

The FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one real step of the pass
(its batch, stacked forward, loss and backward): two per multiply-accumulate of every matrix
product (``mm``, ``addmm``, ``bmm``, ...). It leaves out what is not a matrix product: element-wise
work (norms, activations, softmax, the loss terms, the loss-state update), the batch gather and the
optimiser, which on this head are memory-bound, not arithmetic. A step at its floor would run every
product at the large GEMM's speed and everything else for free, so the ratio ``step ÷ floor`` is
≥ 1 and says how much of a step is not arithmetic.

Each epoch gives one ratio (its seconds per step against the GEMM rate sampled right after it, so
that load coming and going on a shared machine hits both alike); the bench reports their median,
in wall time and in CPU time (the process's, all threads: far less disturbed by other jobs).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from raml.extract.engine_bench import GEMM_SIZE, gemm_gflops
from raml.train.divergence import should_stop
from raml.train.loss import updated_state
from raml.train.run_stack import over_runs
from raml.train.step import PassStep

BREAKDOWN_PHASES = ("batch", "forward", "loss", "state update", "backward", "check", "optimiser", "host sync")


def step_flops(step: PassStep, rows: torch.Tensor, state: dict) -> int:
    """FLOPs of the matrix products of one step on ``rows`` [K, B], forward and backward, all runs
    (``FlopCounterMode``); the gradients it leaves are cleared, the parameters and ``state`` untouched."""
    with FlopCounterMode(display=False) as counter:
        losses, _, _ = step.forward_loss(rows, state)
        losses.sum().backward()
    step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
PRODUCT_REPEATS = 5  # each product of a step timed this many times (the fastest counts)


class _RecordProducts(TorchDispatchMode):
    """Records the matrix products that run under it: each one's op and its arguments' shapes and strides."""

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.products.append((func, [(a.shape, a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def products_alone(step: PassStep, rows: torch.Tensor, state: dict) -> float:
    """Seconds that the matrix products of one step (forward and backward) take when each runs alone
    at its own shapes and strides, on fresh operands (the fastest of ``PRODUCT_REPEATS``): what the
    step would cost if nothing but its products took time. Small products run far below the large
    GEMM's rate, so this is above the floor; with its operands hot in cache it is still optimistic."""
    with _RecordProducts() as recorder:
        losses, _, _ = step.forward_loss(rows, state)
        losses.sum().backward()
    step.optimizer.zero_grad(set_to_none=True)
    device, total = step.penalty.device, 0.0
    for func, operands in recorder.products:
        tensors = [
            torch.randn(sum((n - 1) * s for n, s in zip(shape, stride)) + 1, dtype=dtype, device=device).as_strided(
                shape, stride
            )
            for shape, stride, dtype in operands
        ]
        func(*tensors)
        fastest = float("inf")
        for _ in range(PRODUCT_REPEATS):
            synchronize(device)
            start = time.perf_counter()
            func(*tensors)
            synchronize(device)
            fastest = min(fastest, time.perf_counter() - start)
        total += fastest
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rates(device: torch.device) -> tuple[float, float]:
    """(wall, CPU) GFLOP/s of one fp32 ``GEMM_SIZE``² product on ``device`` (torch's threads on the CPU)."""
    wall, cpu = time.perf_counter(), time.process_time()
    if device.type == "cpu":
        rate = gemm_gflops(repeats=1)
    else:
        a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
        torch.mm(a, a)
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, a)
        synchronize(device)
        rate = 2 * GEMM_SIZE**3 / (time.perf_counter() - start) / 1e9
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return rate, rate * wall / max(cpu, 1e-9)


@dataclass
class FloorProbe:
    """``on_epoch`` hook of a timed ``fit_runs``: after every epoch, that epoch's wall and CPU seconds and a
    GEMM rate sample. ``ratios`` then gives the step's median ratios to its floor."""

    device: torch.device
    epochs: list = field(default_factory=list)  # (wall s, CPU s, GEMM wall GFLOP/s, GEMM CPU GFLOP/s)
    _cpu: float = field(default_factory=time.process_time)

    def __call__(self, records) -> None:
        synchronize(self.device)
        cpu = time.process_time() - self._cpu
        self.epochs.append((records[0]["seconds"], cpu, *gemm_rates(self.device)))
        self._cpu = time.process_time()

    def summary(self, flops: int, steps: int, skip_first: bool = False) -> dict:
        """Medians over the epochs (without the first when it compiled the step): seconds per step,
        GEMM rate, floor and ratios; and the first epoch's excess over the median (compiling). The CPU
        time of the first epoch includes the pass's preparation, so its CPU ratio leaves it out
        (None with a single epoch)."""
        epochs = self.epochs[1:] if skip_first and len(self.epochs) > 1 else self.epochs
        gemm = statistics.median(e[2] for e in epochs)
        return {
            "flops": flops,
            "step_seconds": statistics.median(e[0] / steps for e in epochs),
            "gemm_gflops": gemm,
            "floor_seconds": flops / (gemm * 1e9),
            "ratio": statistics.median(e[0] / steps / (flops / (e[2] * 1e9)) for e in epochs),
            "cpu_ratio": statistics.median(e[1] / steps / (flops / (e[3] * 1e9)) for e in self.epochs[1:])
            if len(self.epochs) > 1
            else None,
            "first_epoch_excess": self.epochs[0][0] - statistics.median(e[0] for e in epochs),
            "epochs": len(self.epochs),
        }


def step_breakdown(step: PassStep, state: dict, order: torch.Tensor) -> dict[str, float]:
    """Median seconds of each phase of a step (``BREAKDOWN_PHASES``) over the batches of ``order``
    [steps, K, B], the step run phase by phase (``train.step``), eagerly, with the device synchronised
    after each phase. "state update" times the loss-state update of the default loss (``train.loss.
    updated_state``) apart, on the step's features; it is part of "loss". "host sync" is the host's
    read of the divergence flags (every step on the CPU, once per epoch on a GPU)."""
    device = step.penalty.device
    update = over_runs(updated_state, step.stack.runs)
    failed_at = torch.zeros(step.stack.runs, dtype=torch.long, device=device)
    times = {phase: [] for phase in BREAKDOWN_PHASES}

    def timed(phase, function, *args):
        start = time.perf_counter()
        result = function(*args)
        synchronize(device)
        times[phase].append(time.perf_counter() - start)
        return result

    for rows in order:
        batch = timed("batch", step.batch, rows)
        outputs = timed("forward", step.forward, batch)
        losses, stats, new_state = timed("loss", step.loss, outputs, batch, state)
        _, labels, category, _, *_ = batch
        timed(
            "state update",
            update,
            state,
            step.hp,
            outputs[0].detach(),
            1 - labels,
            category,
            losses.detach()[:, None].expand_as(labels),
        )
        step.optimizer.zero_grad(set_to_none=True)
        timed("backward", losses.sum().backward)
        finite = timed("check", step.finite, losses)
        failed_at = torch.where(~finite, 1, failed_at)
        timed("host sync", should_stop, failed_at, True)
        timed("optimiser", step.update)
        state = new_state
    return {phase: statistics.median(values) for phase, values in times.items()}
