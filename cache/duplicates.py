"""Images stored more than once in a cache: how reading finds them and what it says.

Two ``extract`` runs that did not see each other's work (a cache whose ``cache.json`` was lost
before a re-run, two copies of a cache merged by hand) store some images twice. Reading keeps the
first copy of each, in shard-name order, then row order, and says so once on stderr;
``raml info --repair`` (``cache.repair``) removes the other copies from the shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPAIR_COMMAND = "raml info --repair --cache-dir {cache_dir}"  # rebuilds cache.json, removes duplicate rows
SHARDS_NAMED = 4  # a message about shards names this many, then says how many more


def shard_count(count: int) -> str:
    """``1 shard``, ``3 shards``."""
    return f"{count} shard{'' if count == 1 else 's'}"


def named_shards(names: list[str]) -> str:
    """``a.h5, b.h5, c.h5, d.h5 and 3 more``."""
    more = len(names) - SHARDS_NAMED
    return ", ".join(names[:SHARDS_NAMED]) + (f" and {more} more" if more > 0 else "")


_REPORTED_DUPLICATES = set()  # (cache, shards involved) already reported in this process


def first_copies(columns: dict, shards: list, cache_dir: Path, report: bool) -> tuple[dict, np.ndarray]:
    """``columns`` (in shard order, then row order) without the second and later copies of an image
    (same relpath), and the (shard number, row) of the rows left out; reported on stderr with ``report``."""
    _, first = np.unique(columns["relpath"], return_index=True)  # the first occurrence of each
    if len(first) == len(columns["relpath"]):
        return columns, np.zeros((0, 2), np.int64)
    keep = np.zeros(len(columns["relpath"]), bool)
    keep[first] = True
    copied = np.isin(columns["relpath"], columns["relpath"][~keep])
    involved = [shards[number].name for number in np.unique(columns["shard_file"][copied])]
    if report and (str(Path(cache_dir).resolve()), *involved) not in _REPORTED_DUPLICATES:
        _REPORTED_DUPLICATES.add((str(Path(cache_dir).resolve()), *involved))
        images = len(np.unique(columns["relpath"][~keep]))
        print(
            f"warning: {cache_dir}: {images} images are stored more than once ({int((~keep).sum())} extra copies in "
            f"shards {named_shards(involved)}: two extract runs that did not see each other's work); reading the "
            "first copy of each. Remove the "
            f"other copies: {REPAIR_COMMAND.format(cache_dir=cache_dir)}",
            file=sys.stderr,
            flush=True,
        )
    duplicate_rows = np.stack([columns["shard_file"][~keep], columns["shard_row"][~keep]], axis=1).astype(np.int64)
    return {name: values[keep] for name, values in columns.items()}, duplicate_rows
