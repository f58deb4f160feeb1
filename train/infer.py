"""Anomaly scores of a trained head (docs/method.md#the-heads-and-the-scores): ``s_final = 0.85·s_visual + 0.15·s_text``.

- s_visual = sigmoid(visual logit of the head).
- s_text = sigmoid(100 · (cos(g, t_anomalous) − cos(g, t_normal))): g is the cached global crop
  embedding (crop 0), t_* the category's mean prompt embedding (re-normalised), 100 CLIP's logit
  scale. This is "the difference of cosine similarities mapped to [0, 1]"; it equals CLIP's
  two-class softmax probability of the anomalous prompt.

The text tokens come from the scored table's own cache, so a head trained on MVTec scores a VisA
cache with VisA's category prompts (the transfer protocol).
"""

from __future__ import annotations

import numpy as np
import torch

from raml.cache import FeatureTable
from raml.errors import CacheError
from raml.train.config import TrainConfig

CLIP_LOGIT_SCALE = 100.0
SCORE_BATCH = 256  # images per forward pass when scoring (bounds the float32 copy)


def text_tokens(table_text: dict, categories) -> np.ndarray:
    """[C, 2, D] float32: per category, the mean normal and the mean anomalous prompt embedding,
    each re-normalised to unit length."""
    missing = [c for c in categories if c not in table_text]
    if missing:
        raise CacheError(f"the cache has no text embeddings for categories {', '.join(missing)}")
    tokens = np.stack(
        [
            [np.asarray(table_text[c][kind], np.float32).mean(axis=0) for kind in ("normal", "anomalous")]
            for c in categories
        ]
    )
    return tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)


def text_score(global_features, table_text: dict, categories) -> np.ndarray:
    """s_text per image: ``global_features`` [N, D] (crop 0), ``categories`` [N] category names."""
    categories = np.asarray(categories)
    names = sorted(set(categories.tolist()))
    tokens = text_tokens(table_text, names)  # [C, 2, D]
    index = np.searchsorted(names, categories)
    g = np.asarray(global_features, np.float32)
    g = g / np.linalg.norm(g, axis=-1, keepdims=True)
    cosines = np.einsum("nd,nkd->nk", g, tokens[index])  # [N, 2]
    return 0.5 * (1.0 + np.tanh(0.5 * CLIP_LOGIT_SCALE * (cosines[:, 1] - cosines[:, 0])))  # sigmoid, no overflow


def visual_score(model, features, text_bank, category_index, rows=None, device: str = "cpu") -> np.ndarray:
    """sigmoid(visual logit) of ``features[rows]`` (default: all rows). ``features`` [N, 21, D]
    (any float dtype; gathered and converted to float32 one batch at a time), ``text_bank``
    [C, 2, D], ``category_index`` [len(rows)] indices into it. ``device``: where the head runs."""
    from raml.extract.encoder import resolve_device

    device = resolve_device(device)
    model.eval().to(device)
    rows = np.arange(len(features)) if rows is None else np.asarray(rows)
    bank = torch.as_tensor(text_bank, dtype=torch.float32, device=device)
    category_index = torch.as_tensor(np.asarray(category_index), dtype=torch.long, device=device)
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), SCORE_BATCH):
            batch = torch.as_tensor(np.asarray(features[rows[start : start + SCORE_BATCH]], np.float32), device=device)
            _, logits = model(batch, bank, category_index[start : start + SCORE_BATCH])
            scores.append(torch.sigmoid(logits).cpu().numpy())
    model.cpu()
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def score_rows(
    model,
    table: FeatureTable,
    rows=None,
    visual_weight=TrainConfig.visual_weight,
    text_weight=TrainConfig.text_weight,
    device: str = "cpu",
) -> dict:
    """``visual``, ``text`` and ``final`` scores of ``table``'s ``rows`` (default: all)."""
    rows = np.arange(len(table)) if rows is None else np.asarray(rows)
    categories = table.category[rows]
    names = sorted(set(categories.tolist()))
    bank = text_tokens(table.text, names)
    visual = visual_score(model, table.features, bank, np.searchsorted(names, categories), rows, device)
    text = text_score(table.features[rows, 0], table.text, categories)
    return {"visual": visual, "text": text, "final": visual_weight * visual + text_weight * text}


def pixel_scores(model, tokens, device: str = "cpu") -> np.ndarray:
    """sigmoid of the pixel head's logit of every token: ``tokens`` [n, T, D] (any float dtype) → [n, T]
    float32, the anomaly map's values (``cache.tokens`` says where each token lies)."""
    from raml.extract.encoder import resolve_device

    device = resolve_device(device)
    model.eval().to(device)
    with torch.no_grad():
        logits = [
            model.pixel(torch.as_tensor(np.asarray(tokens[start : start + SCORE_BATCH], np.float32), device=device))[1]
            for start in range(0, len(tokens), SCORE_BATCH)
        ]
    model.cpu()
    return torch.sigmoid(torch.cat(logits)).cpu().numpy() if logits else np.zeros((0, tokens.shape[1]), np.float32)


def fused_score(final, map_max, map_weight: float) -> np.ndarray:
    """The image score that uses the anomaly map: (1 − map_weight)·s_final + map_weight·(the map's
    maximum, its largest token score; both in [0, 1])."""
    return (1.0 - map_weight) * np.asarray(final, float) + map_weight * np.asarray(map_max, float)


def score_weights(checkpoint, visual_weight: float | None = None, text_weight: float | None = None) -> dict:
    """The s_final weights: those given, else the ones the checkpoint was trained with."""
    config = checkpoint.config
    return {
        "visual_weight": config["visual_weight"] if visual_weight is None else visual_weight,
        "text_weight": config["text_weight"] if text_weight is None else text_weight,
    }


def score_table(checkpoint, table: FeatureTable, visual_weight=None, text_weight=None, device: str = "cpu") -> dict:
    """Score every image of ``table`` with a loaded checkpoint (weights: ``score_weights``);
    refuses a cache of another backbone."""
    from raml.train.checkpoint import check_cache

    check_cache(checkpoint, table)
    return score_rows(
        checkpoint.model, table, None, **score_weights(checkpoint, visual_weight, text_weight), device=device
    )
