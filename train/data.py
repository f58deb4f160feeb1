"""The training rows as tensors on the training device (``train.fit``), prepared once per pass: crops,
labels, categories and text tokens, the pixel loss's tokens and targets, each run's resolution
penalties, and the normal features that start the loss state. Every step gathers its batch from
these by index (``train.step``): nothing is collated or copied to the device per step."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from raml.cache import FeatureTable
from raml.cache.reader import token_chunks
from raml.cache.tokens import add_tokens_command
from raml.errors import UserError
from raml.train.config import TrainConfig
from raml.train.infer import text_tokens
from raml.train.loss import image_r_max, resolution_penalty
from raml.train.model import RAMLHead

INIT_BATCH = 256  # images per chunk when preparing tensors and initialising the center and σ


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


@torch.no_grad()
def normal_features(model: RAMLHead, data: TrainingData) -> torch.Tensor:
    """The features of every normal training image under ``model`` (eval mode), [n_normal, f]."""
    model.eval()
    normal = torch.nonzero(data.labels == 0)[:, 0]
    chunks = [model(data.crops[rows], data.text_bank, data.category[rows])[0] for rows in normal.split(INIT_BATCH)]
    model.train()
    return torch.cat(chunks)


@torch.no_grad()
def normal_token_features(model: RAMLHead, pixels: PixelData) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial pixel head's features of every training token [N·P, f], and each one's normal weight."""
    chunks = [model.pixel(tokens.float())[0] for tokens in pixels.tokens.split(INIT_BATCH)]
    normal = pixels.weights * (1 - pixels.targets)
    return torch.cat(chunks).reshape(-1, chunks[0].shape[-1]), normal.reshape(-1)
