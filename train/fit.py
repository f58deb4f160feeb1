"""Stage two: train RAML heads on cached features (never loads CLIP).

``fit`` trains one run; ``fit_runs`` trains several runs at once, as one stacked model
(``train.run_stack.RunStack``): every parameter gets a leading "run" axis, and one forward pass,
one backward pass and one optimizer step serve all K runs (``torch.func.vmap`` over
``functional_call`` of the same ``RAMLHead``). A run trained alone is a stack of one: the training
loop has a single path. Each run keeps what makes it its own run: its seed (initial weights and
batch order), its loss scalars (margin values, α/β/γ, BCE weight, temperature, momenta), its r_max
mode, its learning rate, weight decay and gradient clip (one AdamW parameter group per run), its
loss state (center, σ, difficulty EMAs) and its history. The runs of one call must share what
changes shapes or code paths (``group_key``); ``train/sweep.py`` groups a sweep accordingly. The K
runs share one copy of the cached features; only their batch indices differ. A run trained alone
and the same run trained in a pass agree to float rounding (the tests check held-out scores within
1e-4).

Speed (``bench train`` measures each step against its arithmetic floor): the training rows are
converted once to float32 tensors on the device (``train.data``), batches are gathered from them by
index, the loss state and the logged statistics stay on the device (the host reads them once per
epoch), and AdamW runs fused (``train.step``). ``compile=True`` compiles the step (``train.step``).

Threads: one torch thread by default. The matrices of a batch of 16 are small; on a busy
machine (other jobs, parallel sweep workers) two OpenMP threads waiting on each other made steps
10–20× slower in our measurements, so ``threads=2`` pays only on an idle machine.

Determinism: weights are initialised under ``torch.manual_seed(seed)`` (in a forked RNG state)
and batches drawn from a generator seeded with ``seed``; every CPU op used is deterministic, so
the same cache, config, torch thread count and ``compile`` setting give identical weights on the
CPU (another thread count, or compiling, may change the last bits). On CUDA, matrix products and
``index_add_`` may reorder sums from run to run: results agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raml.cache import FeatureTable
from raml.cache.files import atomic_write_text, make_dirs
from raml.errors import UserError
from raml.extract.encoder import resolve_device
from raml.train.checkpoint import save_checkpoint
from raml.train.config import TrainConfig
from raml.train.data import (
    normal_features,
    normal_token_features,
    pixel_plan,
    pixel_training_data,
    run_resolution_penalty,
    training_data,
)
from raml.train.divergence import TrainingDiverged, divergence_message, divergence_record, should_stop
from raml.train.infer import score_rows
from raml.train.loss import (
    PIXEL_TERMS,
    STEP_STATS,
    TERMS,
    initial_loss_state,
    initial_pixel_state,
    loss_hyperparameters,
    loss_step,
    state_margins,
    weights_of,
    with_pixel_loss,
)
from raml.train.model import RAMLHead, build_head
from raml.train.run_stack import RunStack, stack_dicts, unstack_dict
from raml.train.split import Split, holdout_split
from raml.train.step import PassStep
from raml.train.thresholds import calibrate_thresholds

# Settings that change the head's shapes, the batches or the loss's code path: runs trained in one
# pass must agree on them (everything else is a per-run scalar).
GROUP_FIELDS = (
    "epochs",
    "batch_size",
    "split_seed",
    "holdout_fraction",
    "hidden_dim",
    "attn_dim",
    "feature_dim",
    "scales",
    "cross_attention",
    "text_fusion",
    "tile_pool",
    "loss",
    "loss_variant",
    "pixel_head",
    "pixel_hidden_dim",
    "pixel_tokens",
)


def group_key(config: TrainConfig) -> tuple:
    """What runs must share to be trained in one pass (see ``GROUP_FIELDS``)."""
    return tuple((name, getattr(config, name)) for name in GROUP_FIELDS)


@dataclass
class TrainedHead:
    model: RAMLHead
    loss_state: dict
    config: TrainConfig
    split: Split
    categories: list
    thresholds: dict  # train.infer.calibrate_thresholds on the training images
    fingerprint: dict
    history: list = field(default_factory=list)
    runs_in_pass: int = 1  # how many runs were trained together with this one
    device: str = "cpu"
    pixel_head: str = "off"  # ``pixel_plan``'s words: whether a pixel head was trained, and why
    diverged: dict | None = None  # ``divergence_record`` of a run whose loss or gradient stopped being finite


def epoch_line(record: dict, epochs: int) -> str:
    terms = "  ".join(f"{name} {record[name]:.4f}" for name in TERMS + PIXEL_TERMS[:1] if name in record)
    return (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  {terms}  |  "
        f"m {record['mean_margin']:.3f}  σ {record['sigma']:.3f}  inside {record['anomalous_inside_margin']:.2f}"
        f"  |  {record['seconds']:.1f} s"
    )


def pass_line(records: list[dict], epochs: int, diverged: int = 0) -> str:
    losses = [record["loss"] for record in records if math.isfinite(record["loss"])]
    spread = f"loss {min(losses):.4f}–{max(losses):.4f}" if losses else "no finite loss"
    return (
        f"epoch {records[0]['epoch']:>{len(str(epochs))}}/{epochs}  {len(records)} runs  {spread}"
        + (f"  ({diverged} diverged)" if diverged else "")
        + f"  |  {records[0]['seconds']:.1f} s"
    )


@contextmanager
def torch_threads(count: int | None):
    """Run the block with ``count`` torch threads (None: leave the setting alone)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit(
    table: FeatureTable,
    config: TrainConfig,
    split: Split | None = None,
    progress=None,
    threads: int | None = 1,
    device: str = "cpu",
    compile: bool = False,
    on_epoch=None,
) -> TrainedHead:
    """Train one head on ``split.train`` (default: ``holdout_split`` with the config's split seed).

    ``progress``, if given, is called with one line per epoch (loss terms, mean margin, σ);
    ``on_epoch``, if given, with each epoch's history entry (a dict) as it ends.
    ``threads``: torch threads while training (see the module docstring); ``device``: "cpu",
    "cuda", "cuda:N" or "auto"; ``compile``: compile the step (``train.step``). Raises
    ``TrainingDiverged`` at the first step whose loss or gradient is not finite (on a GPU, at the
    end of that epoch: the step is still the first one).
    """
    hook = None if on_epoch is None else lambda records: on_epoch(records[0])
    return fit_runs(table, [config], split, progress, threads, device, True, compile, hook)[0]


def fit_runs(
    table: FeatureTable,
    configs: list[TrainConfig],
    split: Split | None = None,
    progress=None,
    threads: int | None = 1,
    device: str = "cpu",
    stop_on_divergence: bool = False,
    compile: bool = False,
    on_epoch=None,
) -> list[TrainedHead]:
    """Train every config at once (see the module docstring); they must share ``group_key``.

    A run whose loss or gradient stops being finite is diverged: with ``stop_on_divergence`` the
    pass stops (``TrainingDiverged``); otherwise it is returned with ``diverged`` set (no thresholds,
    nothing to write) and the other runs go on (runs share no parameter), the pass stopping early
    once every run has diverged. ``on_epoch``, if given, is called after every epoch with the list
    of that epoch's history entries, one per config, in the order of ``configs``."""
    if len({group_key(config) for config in configs}) != 1:
        raise ValueError(
            "fit_runs: the configs differ in settings that change shapes or the loss "
            f"({', '.join(GROUP_FIELDS)}); train them in separate passes"
        )
    order = sorted(range(len(configs)), key=lambda k: (configs[k].lr, configs[k].weight_decay))  # stable
    hook = (
        None if on_epoch is None else lambda records: on_epoch([records[order.index(k)] for k in range(len(configs))])
    )
    with torch_threads(threads):
        trained = _fit_runs(
            table,
            [configs[k] for k in order],
            split or holdout_split(table, configs[0].split_seed, configs[0].holdout_fraction),
            progress,
            resolve_device(device),
            stop_on_divergence,
            compile,
            hook,
        )
    return [trained[order.index(k)] for k in range(len(configs))]


def prepare_pass(table: FeatureTable, configs, split: Split, device, compile: bool = False) -> tuple:
    """``(step, state, pixel_words)``: the step of a pass of ``configs`` (``train.step.PassStep``), the
    runs' stacked starting loss state and ``pixel_plan``'s words. Refuses a training set without a
    whole batch or without both classes."""
    first = configs[0]
    data = training_data(table, split.train, device)
    n_images = len(data.labels)
    if n_images // first.batch_size == 0 or data.labels.min() == data.labels.max():
        raise UserError(
            f"{table.cache_dir}: {n_images} training images "
            f"({int(data.labels.sum())} anomalous); need at least one batch of "
            f"{first.batch_size} and both normal and anomalous images"
        )
    with_pixels, pixel_words = pixel_plan(first, table, split.train)
    pixels = pixel_training_data(table, split.train, first.pixel_tokens, device) if with_pixels else None
    models = []
    for config in configs:
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(config.seed)
            models.append(build_head(config, data.crops.shape[-1], pixel_head=with_pixels).to(device))
    penalty = torch.from_numpy(np.stack([run_resolution_penalty(table, split.train, c) for c in configs])).to(device)
    hp = [{name: value.to(device) for name, value in loss_hyperparameters(c).items()} for c in configs]
    states = [
        initial_loss_state(c, normal_features(model, data), len(data.categories))
        | (initial_pixel_state(*normal_token_features(model, pixels)) if with_pixels else {})
        for c, model in zip(configs, models)
    ]
    step_fn = with_pixel_loss(loss_step(first)) if with_pixels else loss_step(first)
    stack = RunStack(models, configs)
    for model in models:
        model.train()
    return (
        PassStep(stack, step_fn, data, pixels, penalty, stack_dicts(hp), first.lr, compile),
        stack_dicts(states),
        pixel_words,
    )


def batch_order(generators, n_images: int, steps: int, batch_size: int, device) -> torch.Tensor:
    """[steps, K, B]: each run's epoch of batches, drawn by its own generator (its seed's order)."""
    return torch.stack(
        [torch.randperm(n_images, generator=g)[: steps * batch_size].view(steps, batch_size) for g in generators],
        dim=1,
    ).to(device)


def _fit_runs(table, configs, split, progress, device, stop_on_divergence, compile, on_epoch) -> list[TrainedHead]:
    first = configs[0]
    runs, batch_size, epochs = len(configs), first.batch_size, first.epochs
    step, state, pixel_words = prepare_pass(table, configs, split, device, compile)
    data, hps = step.data, unstack_dict(step.hp, runs)
    stat_names = STEP_STATS + (PIXEL_TERMS if step.pixels is not None else ())
    n_images = len(data.labels)
    steps = n_images // batch_size
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    histories = [[] for _ in configs]
    # Divergence: each step marks the runs whose loss or gradient is not finite (on the device, no
    # sync); on the CPU it is looked at every step, on a GPU once per epoch (the host syncs then anyway).
    failed_at = torch.zeros(runs, dtype=torch.long, device=device)  # global step of the first failure; 0: none
    failed_stats = torch.zeros(runs, len(stat_names), device=device)
    every_step = device.type == "cpu"
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        totals = torch.zeros(runs, len(stat_names), device=device)
        for step_index, rows in enumerate(
            batch_order(generators, n_images, steps, batch_size, device), (epoch - 1) * steps + 1
        ):
            finite, stats, state = step.step(rows, state)
            newly = ~finite & (failed_at == 0)
            failed_at = torch.where(newly, step_index, failed_at)
            failed_stats = torch.where(newly[:, None], stats, failed_stats)
            if every_step and should_stop(failed_at, stop_on_divergence):
                break
            step.update()
            totals += stats
        failed = failed_at.cpu()
        if stop_on_divergence and failed.any():
            k = int(failed.nonzero()[0])
            raise TrainingDiverged(
                divergence_record(configs[k], int(failed[k]), steps, dict(zip(stat_names, failed_stats[k].tolist())))
            )
        if should_stop(failed_at, stop_on_divergence):
            break
        seconds = time.perf_counter() - start
        records = [
            _epoch_record(
                epoch,
                dict(zip(stat_names, run_totals.tolist())),
                steps,
                run_state,
                run_hp,
                penalty,
                data,
                seconds,
                runs,
                weights_of(first),
            )
            for run_totals, run_state, run_hp, penalty in zip(
                totals.cpu(), unstack_dict(state, runs), hps, step.penalty
            )
        ]
        for history, record in zip(histories, records):
            history.append(record)
        if progress:
            progress(
                epoch_line(records[0], epochs) if runs == 1 else pass_line(records, epochs, int((failed > 0).sum()))
            )
        if on_epoch:
            on_epoch(records)
    step.stack.write_back()
    failed, failed_stats = failed_at.cpu().tolist(), failed_stats.cpu().tolist()
    trained = []
    for k, (model, config, run_state, history) in enumerate(
        zip(step.stack.models, configs, unstack_dict(state, runs), histories)
    ):
        head = TrainedHead(
            model=model,
            loss_state={name: v.detach().cpu() for name, v in run_state.items()},
            config=config,
            split=split,
            categories=data.categories,
            thresholds={},
            fingerprint=dict(table.meta),
            history=history,
            runs_in_pass=runs,
            device=str(device),
            pixel_head=pixel_words,
        )
        if failed[k]:
            head.diverged = divergence_record(config, failed[k], steps, dict(zip(stat_names, failed_stats[k])))
            if progress:
                progress(divergence_message(head.diverged))
        else:
            train_scores = score_rows(
                model, table, split.train, config.visual_weight, config.text_weight, device=str(device)
            )["final"]  # leaves the model on the CPU, in eval mode
            head.thresholds = calibrate_thresholds(table.label[split.train], train_scores, table.category[split.train])
        trained.append(head)
    return trained


def _epoch_record(epoch, stats, steps, state, hp, penalty, data, seconds, runs, weights) -> dict:
    anomalous = data.labels == 1
    return {
        "epoch": epoch,
        **{name: stats[name] / steps for name in TERMS + PIXEL_TERMS if name in stats},
        "sigma": float(state["sigma"]),
        "mean_margin": float(state_margins(state, hp, penalty[anomalous]).mean()),
        "anomalous_inside_margin": stats["inside_margin"] / max(stats["anomalous"], 1.0),
        "difficulty_weights": dict(zip(data.categories, weights(state, hp).tolist())),
        "seconds": seconds,
        "runs_in_pass": runs,
    }


def write_run(run_dir, trained: TrainedHead) -> Path:
    """``run_dir/{checkpoint.pt, config.json, split.json, history.json}``; the checkpoint last."""
    if trained.diverged is not None:
        raise ValueError("write_run: a diverged run has no checkpoint to write")
    run_dir = write_run_files(run_dir, trained)
    return save_checkpoint(
        run_dir,
        model=trained.model,
        config=trained.config.to_dict(),
        loss_state=trained.loss_state,
        manifest=trained.split.manifest(),
        fingerprint=trained.fingerprint,
        thresholds=trained.thresholds,
        categories=trained.categories,
    )


def write_run_files(run_dir, trained: TrainedHead) -> Path:
    """``run_dir/{config.json, split.json, history.json}``: what a run was, also one that diverged."""
    run_dir = Path(run_dir)
    make_dirs(run_dir)
    write_json(run_dir / "config.json", trained.config.to_dict())
    write_json(run_dir / "split.json", trained.split.manifest())
    write_json(run_dir / "history.json", trained.history)
    return run_dir


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False))
