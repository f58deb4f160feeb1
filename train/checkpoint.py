"""``checkpoint.pt``: everything needed to score a cache with a trained head, and nothing of CLIP.

Holds the head's weights, the full training config, the MACCL loss state (center, σ, difficulty
EMAs), the split manifest, the fingerprint of the cache it was trained on (its ``FINGERPRINT_KEYS``
plus the dataset and, where the cache recorded it, where the backbone came from), the trained
categories and the decision thresholds, one per category (``train.infer.calibrate_thresholds``).
About 5 MB for ViT-B/16 features; readable with ``torch.load(weights_only=True)`` (plain tensors,
numbers, strings, lists and dicts only).

Format 1 (before per-category thresholds) held one ``threshold`` over all training images; such
checkpoints still load, with that number as the pooled threshold and no per-category ones.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raml.cache import mismatched_fields
from raml.cache.files import atomic_write_bytes, make_dirs
from raml.cache.format import FINGERPRINT_KEYS, TOKEN_SETTING_ATTRIBUTE, fingerprint_field, token_setting_problem
from raml.errors import CacheError
from raml.train.config import TrainConfig
from raml.train.split import manifest_problem

if TYPE_CHECKING:
    from raml.train.model import RAMLHead
# torch is imported where a checkpoint is written or read, so that the workspace's commands
# (status, and finding the newest run by its CHECKPOINT_FILE) do not pay seconds for it.

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# Recorded beside the fingerprint keys: which dataset trained the head (the protocols' "same
# dataset" test), where its backbone came from (``predict``/``export`` defaults) and which patch
# tokens its pixel head reads (``check_tokens``). None has to match for features to be comparable,
# so none is a fingerprint key.
PROVENANCE_KEYS = ("dataset", "backbone_source", TOKEN_SETTING_ATTRIBUTE)
FORMAT_1_CALIBRATION = "training images, all categories pooled (a format-1 checkpoint has one threshold)"


@dataclass
class Checkpoint:
    """A loaded ``checkpoint.pt``.

    ``thresholds`` is ``train.infer.calibrate_thresholds``'s output: per category, the F1-max
    threshold of s_final (with the config's visual/text weights) on the calibration images with
    its precision and recall there, and a pooled threshold; ``train.thresholds.threshold_for``
    picks one. Calibrated on training images, they are optimistic; ``evaluate`` reports how they
    do on the held-out images.
    """

    model: RAMLHead  # eval mode, on the CPU
    config: dict  # every hyper-parameter (``TrainConfig.to_dict()``)
    loss_state: dict  # center, sigma, difficulty, difficulty_seen (tensors)
    manifest: dict  # the split manifest (``Split.manifest()``)
    fingerprint: dict  # the training cache's ``FINGERPRINT_KEYS`` and ``PROVENANCE_KEYS``
    thresholds: dict  # ``calibrate_thresholds``: {"set", "rule", "pooled", "categories"}
    categories: list  # trained categories, in the order of the loss state's difficulty
    path: Path


def save_checkpoint(
    run_dir,
    *,
    model: RAMLHead,
    config: dict,
    loss_state: dict,
    manifest: dict,
    fingerprint: dict,
    thresholds: dict,
    categories: list,
) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically; returns its path. ``fingerprint`` is the training
    cache's (extra fields beyond ``FINGERPRINT_KEYS`` and ``PROVENANCE_KEYS`` are dropped)."""
    import torch

    path = Path(run_dir) / CHECKPOINT_FILE
    make_dirs(path.parent)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()},
        "config": dict(config),
        "loss_state": {name: tensor.detach().cpu().clone() for name, tensor in loss_state.items()},
        "manifest": manifest,
        "fingerprint": {
            **{key: fingerprint_field(fingerprint, key) for key in FINGERPRINT_KEYS},
            **{key: fingerprint[key] for key in PROVENANCE_KEYS if fingerprint.get(key) is not None},
        },
        "thresholds": thresholds,
        "categories": list(categories),
    }
    buffer = io.BytesIO()  # serialised in memory: a failed write is then an OSError of ours (cache.files)
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path) -> Checkpoint:
    """Load a run directory's ``checkpoint.pt`` (or the file itself)."""
    import torch

    from raml.train.model import build_head

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (train one with: raml train ...)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CacheError(f"{path}: not a readable RAML checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise CacheError(f"{path}: not a RAML checkpoint of format {' or '.join(map(str, READABLE_FORMATS))}")
    try:  # a checkpoint edited or damaged in a way torch.load does not notice
        config = TrainConfig.from_dict(payload["config"]).to_dict()  # fields added since: their defaults
        pixel_head = any(name.startswith("pixel.") for name in payload["state_dict"])
        model = build_head(config, payload["fingerprint"]["embed_dim"], pixel_head=pixel_head)
        model.load_state_dict(payload["state_dict"])
        model.eval()
        checkpoint = Checkpoint(
            model=model,
            config=config,
            loss_state=dict(payload["loss_state"]),
            manifest=payload["manifest"],
            fingerprint=payload["fingerprint"],
            thresholds=_thresholds(payload),
            categories=list(payload["categories"]),
            path=path,
        )
        problem = (
            manifest_problem(checkpoint.manifest)
            or thresholds_problem(checkpoint.thresholds)
            or token_setting_problem(checkpoint.fingerprint.get(TOKEN_SETTING_ATTRIBUTE))
        )
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CacheError(f"{path}: not a usable RAML checkpoint ({type(err).__name__}: {err})") from None
    if problem:
        raise CacheError(f"{path}: not a usable RAML checkpoint: {problem}")
    return checkpoint


def thresholds_problem(thresholds) -> str | None:
    """Why ``thresholds`` is not a calibration ``train.thresholds.calibrate_thresholds`` wrote, or None."""

    def finite(point) -> bool:
        value = point.get("threshold") if isinstance(point, dict) else "x"
        return value is None or (isinstance(value, (int, float)) and math.isfinite(value))

    if not (
        isinstance(thresholds, dict)
        and isinstance(thresholds.get("pooled"), dict)
        and isinstance(thresholds["pooled"].get("threshold"), (int, float))
        and isinstance(thresholds.get("categories"), dict)
        and finite(thresholds["pooled"])
        and all(finite(point) for point in thresholds["categories"].values())
    ):
        return "its decision thresholds are not numbers per category and pooled"
    return None


def _thresholds(payload: dict) -> dict:
    """The calibration of a checkpoint; format 1's single threshold becomes the pooled one."""
    if payload["format"] >= 2:
        return payload["thresholds"]
    return {
        "set": FORMAT_1_CALIBRATION,
        "rule": "F1-max of s_final, anomalous when s_final >= threshold",
        "pooled": {"threshold": float(payload["threshold"])},
        "categories": {},
    }


def check_cache(checkpoint: Checkpoint, table) -> None:
    """Refuse to score ``table`` with a head trained on features of another backbone."""
    bad = mismatched_fields(checkpoint.fingerprint, table.meta)
    if bad:
        details = "; ".join(
            f"{key}: checkpoint {checkpoint.fingerprint.get(key)!r}, cache {table.meta.get(key)!r}" for key in bad
        )
        raise CacheError(
            f"{checkpoint.path} was trained on features of another backbone than {table.cache_dir} "
            f"({details}). Score this cache with a head trained on its own backbone."
        )


def check_tokens(checkpoint: Checkpoint, setting: dict | None, where) -> None:
    """Refuse to score patch tokens of ``setting`` (``cache.tokens.token_setting``, those of ``where``: a
    cache or a backbone) with a pixel head trained on tokens of another setting."""
    trained = checkpoint.fingerprint.get(TOKEN_SETTING_ATTRIBUTE)
    if trained is not None and setting is not None and trained != setting:
        raise CacheError(
            f"{checkpoint.path}'s pixel head was trained on patch tokens of another setting than those "
            f"of {where} ({trained} vs {setting}); it cannot score them."
        )
