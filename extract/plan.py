"""What an extract run will do, settled before it encodes anything: which images (at most a limit
per category, evenly spaced), which writer slot (``--shard i/n``), and whether their rows fit on
the cache's file system."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

from raml.cache.format import shards_bytes
from raml.cache.writer import estimated_bytes
from raml.errors import CacheError, UserError, human_bytes
from raml.extract.datasets import ImageRecord

SPACE_WARNING = 0.8  # warn when a run would fill more than this share of the free space


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/n"``; without it, torchrun's RANK/WORLD_SIZE, else ``0/1``."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise UserError(f"--shard {shard!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {shard}: need 0 <= i < n")
    return index, count


def check_free_space(
    cache_dir: Path,
    images: int,
    cached,
    embed_dim: int,
    shard_size: int,
    *,
    token_images: int = 0,
    token_bytes: int = 0,
) -> None:
    """Refuse, before any encoding, a run whose ``images`` new rows would not fit on the cache's
    file system, with both numbers; warn on stderr when they would fill most of it. What an image's
    features take is measured on the cache's own shards when it has some without patch tokens
    (``cached``: its table), else estimated (``cache.writer.estimated_bytes``). With patch tokens,
    ``token_images`` images (new ones and cached ones getting theirs) need ``token_bytes`` more each."""
    if not images and not token_images:
        return
    if cached is not None and len(cached) and not cached.has_tokens.any():
        per_image = shards_bytes(cache_dir) / len(cached)
        need, how = images * per_image, f"{human_bytes(per_image)} per image, as this cache's shards take"
    else:
        need = estimated_bytes(images, embed_dim, shard_size)
        how = f"about {human_bytes(need / max(images, 1))} per image"
    if token_images:
        need += token_images * token_bytes
        how += f", and {human_bytes(token_bytes)} of patch tokens for each of {token_images} images"
    encoded = max(images, token_images)  # the images that get tokens include the new ones
    existing = next(path for path in (Path(cache_dir).resolve(), *Path(cache_dir).resolve().parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise CacheError(
            f"{cache_dir}: {encoded} images to encode need about {human_bytes(need)} "
            f"({how}), but its file system has {human_bytes(free)} free. Free some space or choose "
            "another --cache-dir; nothing was encoded."
        )
    if need > SPACE_WARNING * free:
        print(
            f"extract: warning: {encoded} images to encode need about {human_bytes(need)} ({how}) of "
            f"the {human_bytes(free)} free on the file system of {cache_dir}",
            file=sys.stderr,
            flush=True,
        )


def limit_per_category(records: list[ImageRecord], limit: int | None) -> list[ImageRecord]:
    """At most ``limit`` records per category, spread evenly over the sorted list so that every
    split and defect type is represented."""
    if not limit:
        return records
    chosen = []
    for category in sorted({r.category for r in records}):
        chosen += evenly_spaced([r for r in records if r.category == category], limit)
    return chosen


def evenly_spaced(items: list, count: int) -> list:
    """At most ``count`` of ``items``, spread evenly over the list (the first and the last included)."""
    picks = np.unique(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int))
    return [items[i] for i in picks]


def batch_indices(chunk_sizes: list[int], batch_size: int) -> list[list[int]]:
    """Positions ``0 .. sum(chunk_sizes) - 1`` cut into batches of at most ``batch_size`` that never
    straddle a chunk (one shard's images): the batches of a resumed run are those of an
    uninterrupted one (see the module docstring)."""
    batches, offset = [], 0
    for size in chunk_sizes:
        batches += [list(range(offset + i, offset + min(i + batch_size, size))) for i in range(0, size, batch_size)]
        offset += size
    return batches
