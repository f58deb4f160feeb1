"""Stage two: train the RAML head on cached features (never loads CLIP).

Speed (``bench train``): the training rows are converted once to one float32 tensor, batches
are gathered from it by index (no DataLoader), the loss state and the logged loss terms stay
tensors (one host sync per epoch), and AdamW runs fused.

Threads: one torch thread by default. The matrices of a batch of 16 are small; on a busy
machine (other jobs, parallel sweep workers) two OpenMP threads waiting on each other made steps
10–20× slower in our measurements, so ``threads=2`` pays only on an idle machine, and a sweep
fills the cores with parallel runs instead.

Determinism: weights are initialised under ``torch.manual_seed(seed)`` (in a forked RNG state)
and batches drawn from a generator seeded with ``seed``; every CPU op used is deterministic, so
the same cache, config and torch thread count give identical weights (another thread count may
change the last bits).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache import FeatureTable, UserError
from cache.store import atomic_write_text
from train.checkpoint import save_checkpoint
from train.config import TrainConfig
from train.infer import calibrate_thresholds, score_rows, text_tokens
from train.loss import TERMS, MACCLoss, image_r_max, resolution_penalty
from train.model import RAMLHead, build_head
from train.split import Split, holdout_split

INIT_BATCH = 256    # images per chunk when preparing tensors and initialising the center and σ


@dataclass
class TrainingData:
    """The training rows as tensors, prepared once per run."""

    crops: torch.Tensor               # [N, 21, D] float32
    labels: torch.Tensor              # [N] float32, 1 = anomalous
    category: torch.Tensor            # [N] long, index into ``categories``
    resolution_penalty: torch.Tensor  # [N] float32, max(0, 1 − r/r_max)
    text_bank: torch.Tensor           # [C, 2, D] float32 (normal, anomalous) per category
    categories: list


def training_data(table: FeatureTable, rows, config: TrainConfig) -> TrainingData:
    """Gather ``rows`` of ``table`` into the tensors that training indexes every step."""
    rows = np.asarray(rows)
    names = table.category[rows]
    categories = sorted(set(names.tolist()))
    r_max = image_r_max(table.height[rows], table.width[rows], names, config.r_max)
    crops = np.empty((len(rows), *table.features.shape[1:]), np.float32)
    for start in range(0, len(rows), INIT_BATCH):   # in chunks: no float16 copy of all rows at once
        crops[start:start + INIT_BATCH] = table.features[rows[start:start + INIT_BATCH]]
    return TrainingData(
        crops=torch.from_numpy(crops),
        labels=torch.from_numpy(table.label[rows].astype(np.float32)),
        category=torch.from_numpy(np.searchsorted(categories, names).astype(np.int64)),
        resolution_penalty=torch.from_numpy(resolution_penalty(table.meta["input_size"], r_max).astype(np.float32)),
        text_bank=torch.from_numpy(text_tokens(table.text, categories)),
        categories=categories)


@dataclass
class TrainedHead:
    model: RAMLHead
    loss: MACCLoss
    config: TrainConfig
    split: Split
    categories: list
    thresholds: dict                  # train.infer.calibrate_thresholds on the training images
    fingerprint: dict
    history: list = field(default_factory=list)


def epoch_line(record: dict, epochs: int) -> str:
    terms = "  ".join(f"{name} {record[name]:.4f}" for name in TERMS)
    return (f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  {terms}  |  "
            f"m {record['mean_margin']:.3f}  σ {record['sigma']:.3f}  |  {record['seconds']:.1f} s")


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


def fit(table: FeatureTable, config: TrainConfig, split: Split | None = None, progress=None,
        threads: int | None = 1) -> TrainedHead:
    """Train a head on ``split.train`` (default: ``holdout_split`` with the config's split seed).

    ``progress``, if given, is called with one line per epoch (loss terms, mean margin, σ).
    ``threads``: torch threads while training (see the module docstring).
    """
    with torch_threads(threads):
        return _fit(table, config, split, progress)


def _fit(table, config, split, progress) -> TrainedHead:
    split = split or holdout_split(table, config.split_seed, config.holdout_fraction)
    data = training_data(table, split.train, config)
    n_images = len(data.labels)
    steps = n_images // config.batch_size
    if steps == 0 or data.labels.min() == data.labels.max():
        raise UserError(f"{table.cache_dir}: {n_images} training images "
                         f"({int(data.labels.sum())} anomalous); need at least one batch of "
                         f"{config.batch_size} and both normal and anomalous images")
    with torch.random.fork_rng(devices=[]):   # seed the init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = build_head(config, data.crops.shape[-1])
    loss_fn = MACCLoss(config, len(data.categories), config.feature_dim)
    loss_fn.initialise(_normal_features(model, data))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n_images, generator=generator)[:steps * config.batch_size].view(steps, -1)
        totals = torch.zeros(len(TERMS))
        for rows in order:
            features, logits = model(data.crops.index_select(0, rows), data.text_bank, data.category[rows])
            loss, terms = loss_fn(features, logits, data.labels[rows], data.category[rows],
                                  data.resolution_penalty[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += terms
        record = {"epoch": epoch, **dict(zip(TERMS, (totals / steps).tolist())),
                  "sigma": float(loss_fn.sigma),
                  "mean_margin": float(loss_fn.margins(data.resolution_penalty[data.labels == 1]).mean()),
                  "difficulty_weights": dict(zip(data.categories, loss_fn.weights().tolist())),
                  "seconds": time.perf_counter() - start}
        history.append(record)
        if progress:
            progress(epoch_line(record, config.epochs))
    model.eval()
    train_scores = score_rows(model, table, split.train, config.visual_weight, config.text_weight)["final"]
    return TrainedHead(model=model, loss=loss_fn, config=config, split=split, categories=data.categories,
                       thresholds=calibrate_thresholds(table.label[split.train], train_scores,
                                                       table.category[split.train]),
                       fingerprint=dict(table.meta), history=history)


@torch.no_grad()
def _normal_features(model: RAMLHead, data: TrainingData) -> torch.Tensor:
    model.eval()
    normal = torch.nonzero(data.labels == 0)[:, 0]
    chunks = [model(data.crops[rows], data.text_bank, data.category[rows])[0] for rows in normal.split(INIT_BATCH)]
    model.train()
    return torch.cat(chunks)


def write_run(run_dir, trained: TrainedHead) -> Path:
    """``run_dir/{checkpoint.pt, config.json, split.json, history.json}``; the checkpoint last."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", trained.config.to_dict())
    write_json(run_dir / "split.json", trained.split.manifest())
    write_json(run_dir / "history.json", trained.history)
    return save_checkpoint(run_dir, model=trained.model, config=trained.config.to_dict(),
                           loss_state=trained.loss.state(), manifest=trained.split.manifest(),
                           fingerprint=trained.fingerprint, thresholds=trained.thresholds,
                           categories=trained.categories)


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False))
