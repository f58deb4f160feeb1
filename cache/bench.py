"""``bench cache``: what checking a cache costs when it is read (issue 10 asks for < 10 %).

The same shards are read twice with ``read_cache``: as written (checksums verified, rows
validated) and as a copy without checksums (written the way RAML wrote shards before them; rows
still validated). The validation (``rows_problem``, ``text_problem``) is also timed on its own,
on the same columns. Then

    unchecked read = read of the copy − validation
    cost of the checks = read as written − unchecked read

Reads are of files in the page cache (after a first read), where the checks weigh the most.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import h5py

from cache.store import (CACHE_JSON, read_cache, read_fingerprint, read_shard, rows_problem, shard_paths,
                         text_problem)


@dataclass
class CacheReadBench:
    images: int
    shards: int
    checked_s: float      # read_cache, checksums verified and rows validated (median)
    copy_s: float         # read_cache of the copy without checksums, rows validated (median)
    validation_s: float   # rows_problem + text_problem alone (median)

    @property
    def unchecked_s(self) -> float:
        return self.copy_s - self.validation_s

    @property
    def checks_s(self) -> float:
        return self.checked_s - self.unchecked_s

    def line(self) -> str:
        checksums = self.checked_s - self.copy_s
        return (f"read_cache of {self.images} images in {self.shards} shards: {self.checked_s:.3f} s checked, "
                f"{self.unchecked_s:.3f} s unchecked; checks {self.checks_s:.3f} s = "
                f"{100 * self.checks_s / self.unchecked_s:.1f} % of the unchecked read "
                f"(checksums {checksums:.3f} s, validation {self.validation_s:.3f} s; medians)")


def run_cache_read_bench(cache_dir: Path, work_dir: Path, repeats: int = 7) -> CacheReadBench:
    """Time reading ``cache_dir`` as written and as a copy without checksums made in ``work_dir``."""
    cache_dir, copy = Path(cache_dir), Path(work_dir) / "without-checksums"
    _copy_without_checksums(cache_dir, copy)
    meta = read_fingerprint(cache_dir)
    shards = [(shard["columns"], shard["text"]) for shard in (read_shard(path, meta, with_features=True)
                                                              for path in shard_paths(cache_dir))]

    def validate():
        for columns, text in shards:
            assert rows_problem(columns, meta["embed_dim"]) is None and text_problem(text, meta["embed_dim"]) is None

    read_cache(cache_dir), read_cache(copy)   # into the page cache
    checked, unchecked, validation = [], [], []
    for _ in range(repeats):   # interleaved, so that a busy moment of the machine hits all three
        checked.append(_seconds(lambda: read_cache(cache_dir)))
        unchecked.append(_seconds(lambda: read_cache(copy)))
        validation.append(_seconds(validate))
    return CacheReadBench(images=sum(len(columns["relpath"]) for columns, _ in shards), shards=len(shards),
                          checked_s=statistics.median(checked), copy_s=statistics.median(unchecked),
                          validation_s=statistics.median(validation))


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _copy_without_checksums(cache_dir: Path, copy: Path) -> None:
    copy.mkdir(parents=True, exist_ok=False)
    (copy / CACHE_JSON).write_text((cache_dir / CACHE_JSON).read_text())
    for path in shard_paths(cache_dir):
        with h5py.File(path, "r") as source, h5py.File(copy / path.name, "w") as target:
            for key, value in source.attrs.items():
                if key != "checksums":
                    target.attrs[key] = value

            def copy_dataset(name, item):
                if isinstance(item, h5py.Dataset):
                    target.create_dataset(name, data=item[...], dtype=item.dtype, chunks=item.chunks)
            source.visititems(copy_dataset)
