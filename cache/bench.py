"""``bench cache``: what checking a cache costs when it is read (the target: under 10 %
of a read).

The same shards are read with ``read_cache`` as written (checksums verified, rows validated) and
as a copy without checksums in which validation is switched off, i.e. as RAML read caches before
it had either. Both are read hot (from the page cache, where the checks weigh the most) and cold
(each file evicted from the page cache first with ``posix_fadvise``, as after a reboot or on a
cache larger than memory). Reads alternate between the two copies; medians are reported. The
checks are also timed alone, on the loaded shards: the checksums, the unit-norm test of the
features, and the rest of the validation.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import h5py

import raml.cache.checks
from raml.cache.checks import checksum_problem, float16_squared_norms, rows_problem, text_problem
from raml.cache.format import CACHE_JSON, CHECKSUM_ATTRIBUTE, read_fingerprint, shard_paths
from raml.cache.reader import load_shard, read_cache


@dataclass
class CacheReadBench:
    images: int
    shards: int
    seconds: dict  # (hot|cold, checked|unchecked) and (check, part) → median seconds

    def line(self) -> str:
        parts = []
        for state in ("hot", "cold"):
            checked, unchecked = self.seconds[state, "checked"], self.seconds[state, "unchecked"]
            parts.append(
                f"{state}: {checked:.3f} s checked, {unchecked:.3f} s unchecked, checks "
                f"+{100 * (checked - unchecked) / unchecked:.1f} %"
            )
        checks = ", ".join(f"{part} {1000 * self.seconds['check', part]:.0f} ms" for part in CHECK_PARTS)
        return (
            f"read_cache of {self.images} images in {self.shards} shards (medians): "
            + "; ".join(parts)
            + f". The checks alone: {checks}"
        )


CHECK_PARTS = ("checksums", "unit norms", "other validation")


def run_cache_read_bench(cache_dir: Path, work_dir: Path, repeats: int = 7) -> CacheReadBench:
    """Time reading ``cache_dir`` as written, and a copy of it without checksums (made in
    ``work_dir``) with validation switched off."""
    cache_dir, copy = Path(cache_dir), Path(work_dir) / "unchecked"
    _copy_without_checksums(cache_dir, copy)
    images = len(read_cache(cache_dir, with_features=False))
    unchecked = mock.patch.multiple(raml.cache.checks, rows_problem=lambda *args: None, text_problem=lambda *args: None)
    reads = {"checked": lambda: read_cache(cache_dir), "unchecked": lambda: _with(unchecked, copy)}
    folders = {"checked": cache_dir, "unchecked": copy}
    seconds = {}
    for state in ("hot", "cold"):
        times = {kind: [] for kind in reads}
        for kind in reads:
            reads[kind]()  # first read: files into the page cache
        for _ in range(repeats):
            for kind, read in reads.items():
                if state == "cold":
                    _evict(folders[kind])
                start = time.perf_counter()
                read()
                times[kind].append(time.perf_counter() - start)
        seconds.update({(state, kind): statistics.median(values) for kind, values in times.items()})
    seconds.update(_time_checks(cache_dir, repeats))
    return CacheReadBench(images=images, shards=len(shard_paths(cache_dir)), seconds=seconds)


def _time_checks(cache_dir: Path, repeats: int) -> dict:
    """(check, part) → median seconds of each part of the checks, over all shards, loaded."""
    meta = read_fingerprint(cache_dir)
    shards = [load_shard(path, meta) for path in shard_paths(cache_dir)]
    dim = meta["embed_dim"]
    work = {
        "checksums": lambda: [checksum_problem(shard) for shard in shards],
        "unit norms": lambda: [float16_squared_norms(shard.columns["features"]) for shard in shards],
        "validation": lambda: [(rows_problem(shard.columns, dim), text_problem(shard.text, dim)) for shard in shards],
    }
    times = {name: [] for name in work}
    for _ in range(repeats):
        for name, run in work.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        ("check", "checksums"): median["checksums"],
        ("check", "unit norms"): median["unit norms"],
        ("check", "other validation"): median["validation"] - median["unit norms"],
    }


def _with(patch, cache_dir: Path):
    with patch:
        return read_cache(cache_dir)


def _evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (their pages are clean: written and fsync'ed)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _copy_without_checksums(cache_dir: Path, copy: Path) -> None:
    copy.mkdir(parents=True, exist_ok=False)
    (copy / CACHE_JSON).write_text((cache_dir / CACHE_JSON).read_text())
    for path in shard_paths(cache_dir):
        with h5py.File(path, "r") as source, h5py.File(copy / path.name, "w") as target:
            for key, value in source.attrs.items():
                if key != CHECKSUM_ATTRIBUTE:
                    target.attrs[key] = value

            def copy_dataset(name, item):
                if isinstance(item, h5py.Dataset):
                    target.create_dataset(name, data=item[...], dtype=item.dtype, chunks=item.chunks)

            source.visititems(copy_dataset)
    for path in copy.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
