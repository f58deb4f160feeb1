"""Stage two: train RAML heads on cached features (never loads CLIP).

``fit`` trains one run; ``fit_runs`` trains several runs at once, as one stacked model: every
parameter gets a leading "run" axis (``torch.func.vmap`` over ``functional_call`` of the same
``RAMLHead``), and one forward pass, one backward pass and one optimizer step serve all K runs. Each
run keeps what makes it its own run: its seed (initial weights and batch order), its loss scalars
(margin values, α/β/γ, BCE weight, temperature, momenta), its r_max mode, its learning rate, weight
decay and gradient clip (one AdamW parameter group per run), its loss state (center, σ, difficulty
EMAs) and its history. The runs of one call must share what changes shapes or code paths
(``group_key``); ``train/sweep.py`` groups a sweep accordingly. The K runs share one copy of the
cached features; only their batch indices differ.

A single run (K = 1) takes the plain path (no vmap): a run trained alone and the same run trained
in an ensemble agree to float rounding (the tests check held-out scores within 1e-4).

Speed (``bench train``): the training rows are converted once to one float32 tensor on the
device, batches are gathered from it by index (no DataLoader), the loss state and the logged
statistics stay tensors (one host sync per epoch), and AdamW runs fused.

Threads: one torch thread by default. The matrices of a batch of 16 are small; on a busy
machine (other jobs, parallel sweep workers) two OpenMP threads waiting on each other made steps
10–20× slower in our measurements, so ``threads=2`` pays only on an idle machine.

Determinism: weights are initialised under ``torch.manual_seed(seed)`` (in a forked RNG state)
and batches drawn from a generator seeded with ``seed``; every CPU op used is deterministic, so
the same cache, config and torch thread count give identical weights on the CPU (another thread
count may change the last bits). On CUDA, matrix products and ``index_add_`` may reorder sums from
run to run: results agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import vmap

from raml.cache import FeatureTable
from raml.cache.files import atomic_write_text, make_dirs
from raml.cache.reader import token_chunks
from raml.cache.tokens import add_tokens_command
from raml.errors import UserError
from raml.extract.encoder import resolve_device
from raml.train.checkpoint import save_checkpoint
from raml.train.config import TrainConfig
from raml.train.divergence import TrainingDiverged, divergence_message, divergence_record, finite_gradients, should_stop
from raml.train.infer import score_rows, text_tokens
from raml.train.loss import (
    PIXEL_TERMS,
    STEP_STATS,
    TERMS,
    image_r_max,
    initial_loss_state,
    initial_pixel_state,
    loss_hyperparameters,
    loss_step,
    resolution_penalty,
    state_margins,
    weights_of,
    with_pixel_loss,
)
from raml.train.model import RAMLHead, build_head
from raml.train.run_stack import RunStack, stack_dicts, unstack_dict
from raml.train.split import Split, holdout_split
from raml.train.thresholds import calibrate_thresholds

INIT_BATCH = 256  # images per chunk when preparing tensors and initialising the center and σ
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
class TrainingData:
    """The training rows as tensors on the training device, prepared once per pass."""

    crops: torch.Tensor  # [N, 21, D] float32
    labels: torch.Tensor  # [N] float32, 1 = anomalous
    category: torch.Tensor  # [N] long, index into ``categories``
    text_bank: torch.Tensor  # [C, 2, D] float32 (normal, anomalous) per category
    categories: list


def training_data(table: FeatureTable, rows, device: torch.device) -> TrainingData:
    """Gather ``rows`` of ``table`` into the tensors that training indexes every step."""
    rows = np.asarray(rows)
    names = table.category[rows]
    categories = sorted(set(names.tolist()))
    crops = np.empty((len(rows), *table.features.shape[1:]), np.float32)
    for start in range(0, len(rows), INIT_BATCH):  # in chunks: no float16 copy of all rows at once
        crops[start : start + INIT_BATCH] = table.features[rows[start : start + INIT_BATCH]]
    return TrainingData(
        crops=torch.from_numpy(crops).to(device),
        labels=torch.from_numpy(table.label[rows].astype(np.float32)).to(device),
        category=torch.from_numpy(np.searchsorted(categories, names).astype(np.int64)).to(device),
        text_bank=torch.from_numpy(text_tokens(table.text, categories)).to(device),
        categories=categories,
    )


@dataclass
class PixelData:
    """What the pixel loss reads, for ``pixel_tokens`` tokens of each training image (``chosen_tokens``)."""

    tokens: torch.Tensor  # [N, P, D] float16 on the training device (float32 per batch)
    targets: torch.Tensor  # [N, P] float32: each token's defect fraction (0 where unknown)
    weights: torch.Tensor  # [N, P] float32: 1, or 0 for the tokens of an image whose mask is unknown


def pixel_plan(config: TrainConfig, table: FeatureTable, rows) -> tuple[bool, str]:
    """Whether ``config`` trains a pixel head on ``table``'s ``rows``, and why, in words. ``--pixel-head
    on`` without what it needs is a ``UserError`` saying how to get it."""
    if config.pixel_head == "off":
        return False, "off (--pixel-head off)"
    rows = np.asarray(rows)
    untokened = int((~table.has_tokens[rows]).sum())
    masked = (
        int(((table.label[rows] == 1) & ~np.isnan(table.token_defect[rows]).any(axis=1)).sum()) if not untokened else 0
    )
    if untokened:
        why = (
            f"{untokened} of the {len(rows)} training images have no patch tokens; to add them: "
            f"{add_tokens_command(table.meta, table.cache_dir)}"
        )
    elif not masked:
        why = "no anomalous training image has a defect mask"
    else:
        return True, f"on: trained on {len(rows)} images' patch tokens, {masked} anomalous ones with masks"
    if config.pixel_head == "on":
        raise UserError(f"--pixel-head on: {why}")
    return False, f"off: {why}"


def chosen_tokens(defect: np.ndarray, count: int, name: str) -> np.ndarray:
    """Which of an image's tokens the pixel loss uses (sorted positions): all when there are at most
    ``count``; else its defective ones first, most defective first (up to half of ``count``), then
    others drawn by a generator seeded with the image's ``name``: the same tokens in every run."""
    if count >= len(defect):
        return np.arange(len(defect))
    fraction = np.nan_to_num(defect.astype(np.float32))
    defective = np.flatnonzero(fraction > 0)
    first = defective[np.argsort(-fraction[defective], kind="stable")][: count // 2]
    others = np.setdiff1d(np.arange(len(defect)), first)
    drawn = np.random.default_rng(zlib.crc32(name.encode("utf-8"))).permutation(others)[: count - len(first)]
    return np.sort(np.concatenate([first, drawn]))


def pixel_training_data(table: FeatureTable, rows, count: int, device: torch.device) -> PixelData:
    """Read the training images' tokens (one chunk of images at a time) and keep ``chosen_tokens`` of each."""
    rows = np.asarray(rows)
    per_image = min(count, table.token_defect.shape[1])
    tokens = np.empty((len(rows), per_image, table.meta["embed_dim"]), np.float16)
    targets = np.empty((len(rows), per_image), np.float32)
    for positions, chunk, _ in token_chunks(table, rows):
        for position, image_tokens in zip(positions, chunk):
            defect = table.token_defect[rows[position]]
            chosen = chosen_tokens(defect, per_image, table.relpath[rows[position]])
            tokens[position], targets[position] = image_tokens[chosen], defect[chosen]
    unknown = np.isnan(targets)
    weights = np.where(unknown.any(axis=1, keepdims=True), 0.0, 1.0) * np.ones_like(targets)
    return PixelData(
        tokens=torch.from_numpy(tokens).to(device),
        targets=torch.from_numpy(np.where(unknown, 0.0, targets).astype(np.float32)).to(device),
        weights=torch.from_numpy(weights.astype(np.float32)).to(device),
    )


def run_resolution_penalty(table: FeatureTable, rows, config: TrainConfig) -> np.ndarray:
    """[len(rows)] float32 max(0, 1 − r/r_max) of each training image under ``config.r_max``."""
    rows = np.asarray(rows)
    r_max = image_r_max(table.height[rows], table.width[rows], table.category[rows], config.r_max)
    return resolution_penalty(table.meta["input_size"], r_max).astype(np.float32)


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
    on_epoch=None,
) -> TrainedHead:
    """Train one head on ``split.train`` (default: ``holdout_split`` with the config's split seed).

    ``progress``, if given, is called with one line per epoch (loss terms, mean margin, σ).
    ``threads``: torch threads while training (see the module docstring); ``device``: "cpu",
    "cuda", "cuda:N" or "auto". Raises ``TrainingDiverged`` at the first step whose loss or gradient
    is not finite (on a GPU, at the end of that epoch: the step is still the first one).
    ``on_epoch``, if given, is called after each epoch with ``[its history entry]``.
    """
    return fit_runs(table, [config], split, progress, threads, device, stop_on_divergence=True, on_epoch=on_epoch)[0]


def fit_runs(
    table: FeatureTable,
    configs: list[TrainConfig],
    split: Split | None = None,
    progress=None,
    threads: int | None = 1,
    device: str = "cpu",
    stop_on_divergence: bool = False,
    on_epoch=None,
) -> list[TrainedHead]:
    """Train every config at once (see the module docstring); they must share ``group_key``.

    A run whose loss or gradient stops being finite is diverged: with ``stop_on_divergence`` the
    pass stops (``TrainingDiverged``); otherwise it is returned with ``diverged`` set (no thresholds,
    nothing to write) and the other runs go on (runs share no parameter), the pass stopping early
    once every run has diverged. ``on_epoch``, if given, is called after each epoch with the list of
    that epoch's history entries, one per run (progress bars use it)."""
    if len({group_key(config) for config in configs}) != 1:
        raise ValueError(
            "fit_runs: the configs differ in settings that change shapes or the loss "
            f"({', '.join(GROUP_FIELDS)}); train them in separate passes"
        )
    order = sorted(range(len(configs)), key=lambda k: (configs[k].lr, configs[k].weight_decay))  # stable
    with torch_threads(threads):
        trained = _fit_runs(
            table, [configs[k] for k in order], split, progress, resolve_device(device), stop_on_divergence, on_epoch
        )
    return [trained[order.index(k)] for k in range(len(configs))]


def _fit_runs(table, configs, split, progress, device, stop_on_divergence, on_epoch=None) -> list[TrainedHead]:
    first = configs[0]
    split = split or holdout_split(table, first.split_seed, first.holdout_fraction)
    data = training_data(table, split.train, device)
    n_images, batch_size, epochs = len(data.labels), first.batch_size, first.epochs
    steps = n_images // batch_size
    if steps == 0 or data.labels.min() == data.labels.max():
        raise UserError(
            f"{table.cache_dir}: {n_images} training images "
            f"({int(data.labels.sum())} anomalous); need at least one batch of "
            f"{batch_size} and both normal and anomalous images"
        )
    runs = len(configs)
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
        initial_loss_state(c, _normal_features(model, data), len(data.categories))
        | (initial_pixel_state(*_normal_token_features(model, pixels)) if with_pixels else {})
        for c, model in zip(configs, models)
    ]
    step_fn = with_pixel_loss(loss_step(first)) if with_pixels else loss_step(first)
    stat_names = STEP_STATS + (PIXEL_TERMS if with_pixels else ())
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    if runs == 1:
        stack = None
        forward, step, state, hp_runs = models[0], step_fn, states[0], hp[0]
        optimizer = torch.optim.AdamW(models[0].parameters(), lr=first.lr, weight_decay=first.weight_decay, fused=True)
    else:
        stack = RunStack(models, configs)
        forward, step, state, hp_runs = stack.forward, vmap(step_fn), stack_dicts(states), stack_dicts(hp)
        optimizer = torch.optim.AdamW(stack.param_groups(), lr=first.lr, fused=True)
    histories = [[] for _ in configs]
    for model in models:
        model.train()
    # Divergence: each step marks the runs whose loss or gradient is not finite (on the device, no
    # sync); on the CPU it is looked at every step, on a GPU once per epoch (the host syncs then anyway).
    failed_at = torch.zeros(runs, dtype=torch.long, device=device)  # global step of the first failure; 0: none
    failed_stats = torch.zeros(runs, len(stat_names), device=device)
    every_step = device.type == "cpu"
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.stack(
            [torch.randperm(n_images, generator=g)[: steps * batch_size].view(steps, batch_size) for g in generators],
            dim=1,
        ).to(device)  # [steps, K, B]
        totals = torch.zeros(runs, len(stat_names), device=device)
        for step_index, rows in enumerate(order, start=(epoch - 1) * steps + 1):
            if stack is None:
                rows = rows[0]
                outputs = forward(
                    data.crops.index_select(0, rows), data.text_bank, data.category[rows], *_pixel_batch(pixels, rows)
                )
                loss, stats, state = step(
                    *outputs[:2],
                    data.labels[rows],
                    data.category[rows],
                    penalty[0, rows],
                    *_pixel_step_inputs(outputs, pixels, rows),
                    state,
                    hp_runs,
                )
                stats, losses = stats[None], loss.detach()[None]
            else:
                crops = data.crops.index_select(0, rows.reshape(-1)).view(*rows.shape, *data.crops.shape[1:])
                outputs = forward(crops, data.text_bank, data.category[rows], *_pixel_batch(pixels, rows))
                losses, stats, state = step(
                    *outputs[:2],
                    data.labels[rows],
                    data.category[rows],
                    penalty.gather(1, rows),
                    *_pixel_step_inputs(outputs, pixels, rows),
                    state,
                    hp_runs,
                )
                loss = losses.sum()  # runs share no parameter: each gets its own loss's gradient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            finite = torch.isfinite(losses.detach()) & (
                stack.finite_gradients() if stack is not None else finite_gradients(models[0])
            )
            newly = ~finite & (failed_at == 0)
            failed_at = torch.where(newly, step_index, failed_at)
            failed_stats = torch.where(newly[:, None], stats.detach(), failed_stats)
            if every_step and should_stop(failed_at, stop_on_divergence):
                break
            if stack is not None:
                stack.clip_gradients()
            elif first.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(models[0].parameters(), first.grad_clip_norm)
            optimizer.step()
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
        run_states = [state] if runs == 1 else unstack_dict(state, runs)
        records = [
            _epoch_record(
                epoch,
                dict(zip(stat_names, run_totals.tolist())),
                steps,
                run_state,
                run_hp,
                penalty[k],
                data,
                seconds,
                runs,
                weights_of(first),
            )
            for k, (run_totals, run_state, run_hp) in enumerate(zip(totals.cpu(), run_states, hp))
        ]
        for history, record in zip(histories, records):
            history.append(record)
        if progress:
            progress(
                epoch_line(records[0], epochs) if runs == 1 else pass_line(records, epochs, int((failed > 0).sum()))
            )
        if on_epoch:
            on_epoch(records)
    if stack is not None:
        stack.write_back()
    final_states = [state] if runs == 1 else unstack_dict(state, runs)
    failed, failed_stats = failed_at.cpu().tolist(), failed_stats.cpu().tolist()
    trained = []
    for k, (model, config, run_state, history) in enumerate(zip(models, configs, final_states, histories)):
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


def _pixel_batch(pixels: PixelData | None, rows: torch.Tensor) -> tuple:
    """The forward pass's extra input: the batch's tokens (float32), [B, P, D] or [K, B, P, D]; none
    without a pixel head."""
    if pixels is None:
        return ()
    return (pixels.tokens.index_select(0, rows.reshape(-1)).view(*rows.shape, *pixels.tokens.shape[1:]).float(),)


def _pixel_step_inputs(outputs: tuple, pixels: PixelData | None, rows: torch.Tensor) -> tuple:
    """The pixel loss's inputs after the image loss's: pixel features and logits, targets, weights."""
    if pixels is None:
        return ()
    return (*outputs[2:], pixels.targets[rows], pixels.weights[rows])


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


@torch.no_grad()
def _normal_token_features(model: RAMLHead, pixels: PixelData) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial pixel head's features of every training token [N·P, f], and each one's normal weight."""
    chunks = [model.pixel(tokens.float())[0] for tokens in pixels.tokens.split(INIT_BATCH)]
    normal = pixels.weights * (1 - pixels.targets)
    return torch.cat(chunks).reshape(-1, chunks[0].shape[-1]), normal.reshape(-1)


@torch.no_grad()
def _normal_features(model: RAMLHead, data: TrainingData) -> torch.Tensor:
    model.eval()
    normal = torch.nonzero(data.labels == 0)[:, 0]
    chunks = [model(data.crops[rows], data.text_bank, data.category[rows])[0] for rows in normal.split(INIT_BATCH)]
    model.train()
    return torch.cat(chunks)


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
