"""The holdout protocol (docs/method.md#the-holdout-split): which images train and which are held out.

Training and evaluation both call ``holdout_split``, and every run writes the split's manifest,
so a table can prove (``image_list_hash``) that its rows were scored on the same images.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass

import numpy as np

from raml.cache import FeatureTable
from raml.errors import CacheError, UserError


def image_list_hash(relpaths) -> str:
    """sha256 of the sorted, newline-joined relpaths: one id for a set of images."""
    return hashlib.sha256("\n".join(sorted(str(p) for p in relpaths)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Split:
    """Row indices (into the table the split was made from) of the training and held-out images."""

    train: np.ndarray
    heldout: np.ndarray
    train_relpaths: list
    heldout_relpaths: list
    seed: int
    fraction: float

    def manifest(self) -> dict:
        """What ``split.json`` holds: the protocol, its parameters and both image lists with hashes."""
        return {
            "protocol": "holdout",
            "seed": self.seed,
            "fraction": self.fraction,
            "train": sorted(self.train_relpaths),
            "heldout": sorted(self.heldout_relpaths),
            "train_hash": image_list_hash(self.train_relpaths),
            "heldout_hash": image_list_hash(self.heldout_relpaths),
        }


def manifest_problem(manifest) -> str | None:
    """Why ``manifest`` is not a split manifest RAML wrote (``Split.manifest``), or None: both
    image lists of text, each with the hash recorded beside it."""
    if not isinstance(manifest, dict):
        return f"the split manifest is a {type(manifest).__name__}, not an object"
    for part in ("train", "heldout"):
        images = manifest.get(part)
        if not isinstance(images, list) or not all(isinstance(relpath, str) and relpath for relpath in images):
            return f"its {part!r} image list is missing or holds something other than image paths"
        if manifest.get(f"{part}_hash") != image_list_hash(images):
            return f"its {part!r} image list does not match its {part}_hash (edited or corrupted)"
    return None


def heldout_counts(class_sizes: list[int], fraction: float) -> list[int]:
    """How many images of each class (normal, anomalous) of one category's test set to hold out.

    The total is ``ceil(fraction · n_test)``, shared between the classes in proportion to their
    size (largest remainder, ties to the first class); then every class with at least two images
    holds out at least one and keeps at least one for training. A class with a single image keeps
    it for training. MVTec toothbrush (12 normal, 30 anomalous test images) → 3 and 6.
    """
    total = math.ceil(fraction * sum(class_sizes) - 1e-9)
    exact = [total * size / sum(class_sizes) if sum(class_sizes) else 0.0 for size in class_sizes]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(class_sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return [0 if size < 2 else min(max(count, 1), size - 1) for count, size in zip(counts, class_sizes)]


def holdout_split(table: FeatureTable, seed: int = 0, fraction: float = 0.2) -> Split:
    """Per category: every official-train image trains; the official test images are split
    stratified by label, ``heldout_counts`` of each class held out, chosen by a generator seeded
    with (seed, category, label) so a category's split does not depend on the other categories.

    Raises ``UserError`` when nothing would be held out (no class of any category has 2 test
    images): a run without held-out images has nothing to be evaluated on.
    """
    if not 0 < fraction < 1:
        raise UserError(f"holdout fraction must be in (0, 1), got {fraction}")
    unknown = sorted(set(table.split.tolist()) - {"train", "test"})
    if unknown:
        raise CacheError(f"{table.cache_dir}: split values {unknown} are neither 'train' nor 'test'")
    train, heldout, test_sizes = [], [], {}
    for category in table.categories:
        in_category = table.category == category
        train.append(np.flatnonzero(in_category & (table.split == "train")))
        test_by_class = [
            np.flatnonzero(in_category & (table.split == "test") & (table.label == label)) for label in (0, 1)
        ]
        test_sizes[category] = [len(rows) for rows in test_by_class]
        counts = heldout_counts(test_sizes[category], fraction)
        for label, (rows, count) in enumerate(zip(test_by_class, counts)):
            rows = rows[np.argsort(table.relpath[rows], kind="stable")]
            rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8")), label])
            chosen = np.zeros(len(rows), bool)
            chosen[rng.permutation(len(rows))[:count]] = True
            heldout.append(rows[chosen])
            train.append(rows[~chosen])
    train = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    heldout = np.sort(np.concatenate(heldout)) if heldout else np.zeros(0, np.int64)
    if heldout.size == 0:
        raise UserError(empty_holdout_message(table, test_sizes))
    return Split(
        train=train,
        heldout=heldout,
        train_relpaths=table.relpath[train].tolist(),
        heldout_relpaths=table.relpath[heldout].tolist(),
        seed=int(seed),
        fraction=float(fraction),
    )


def empty_holdout_message(table: FeatureTable, test_sizes: dict) -> str:
    """Why the holdout split of ``table`` is empty, and how many images it needs."""
    listed = "; ".join(
        f"{category}: {normal} normal, {anomalous} anomalous"
        for category, (normal, anomalous) in list(test_sizes.items())[:5]
    )
    more = f" and {len(test_sizes) - 5} more categories" if len(test_sizes) > 5 else ""
    return (
        f"{table.cache_dir}: the holdout split would hold out no image, so the run could not be evaluated. "
        f"Official test images per category: {listed or 'none'}{more}. A class holds one image out only when "
        "it has at least 2 test images (one stays for training); a category needs at least 2 normal and 2 "
        "anomalous test images for its held-out part to have both classes (an AUROC). Add test images (or "
        "extract without --limit)."
    )


def rows_for(table: FeatureTable, relpaths) -> np.ndarray:
    """Row indices of ``relpaths`` in ``table`` (in the given order); names the missing images."""
    index = {path: row for row, path in enumerate(table.relpath.tolist())}
    relpaths = list(relpaths)
    missing = [path for path in relpaths if path not in index]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CacheError(
            f"{table.cache_dir}: {len(missing)} of the {len(relpaths)} images of the split are not "
            f"in this cache: {shown}. Was it extracted from another dataset root or with --limit?"
        )
    return np.array([index[path] for path in relpaths], dtype=np.int64)
