"""One writer per shard slot: ``fcntl.flock`` on ``<cache>/extract-{i}of{n}.lock``.

A writer slot is a (cache directory, ``--shard i/n``) pair; its shards are named
``features-{i}of{n}-*.h5``. Two processes writing one slot would pick the same next shard file and
corrupt it, so ``WriterSlot`` takes the slot's lock for the whole run and a second writer stops at
once, naming the process that holds it. The slots of one shard count (``0/2`` and ``1/2``) are
disjoint and run side by side; writers with different shard counts would encode the same images
twice, so they cannot hold a cache at the same time.

An ``flock`` belongs to the open file: the kernel releases it when the holder exits, however it
exits (``kill -9`` included), so a lock is never stale. The file itself stays, holding the PID of
its last holder, for the messages. A partial shard whose slot lock is free was left by a killed
writer: ``WriterSlot`` removes those of its cache, and ``partial_shard_status`` tells them apart
for ``info``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from raml.cache.files import make_dirs
from raml.cache.format import partial_shards, slot_of_partial
from raml.errors import CacheError

# Another process may hold a slot's lock for an instant to see whether it is free (a probe, below);
# a writer retries that long before it concludes that the slot is taken.
PROBE_GRACE_S = 0.5


def lock_path(cache_dir: Path, shard_index: int, shard_count: int) -> Path:
    return Path(cache_dir) / f"extract-{shard_index:03d}of{shard_count:03d}.lock"


class WriterSlot:
    """Hold the lock of slot ``shard_index``/``shard_count`` of ``cache_dir`` (a context manager).

    Entering raises ``CacheError``, having written nothing but the lock file, if another process
    holds this slot or a slot of another shard count of the same cache.
    """

    def __init__(self, cache_dir: Path, shard_index: int, shard_count: int):
        self.cache_dir, self.shard_index, self.shard_count = Path(cache_dir), shard_index, shard_count
        self.path = lock_path(cache_dir, shard_index, shard_count)
        self._fd = None

    def __enter__(self) -> WriterSlot:
        make_dirs(self.cache_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _lock(fd, wait_s=PROBE_GRACE_S):
            holder = describe_holder(self.path)
            os.close(fd)
            raise CacheError(
                f"{self.cache_dir}: shard {self.shard_index}/{self.shard_count} is being written by {holder} "
                f"(lock {self.path.name}). One writer per shard: wait for it to finish, or stop it and re-run."
            )
        self._fd = fd
        try:
            other = self._other_shard_count_at_work()
            if other is not None:
                raise CacheError(
                    f"{self.cache_dir}: {other[1]} is extracting with --shard {other[0]}; writers with "
                    f"different shard counts would encode the same images twice. Wait for it, or use "
                    f"--shard i/{other[0].split('/')[1]} as it does."
                )
            os.ftruncate(fd, 0)
            os.write(
                fd,
                json.dumps(
                    {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
                ).encode(),
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a later contender must not name this finished process
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def remove_stale_partials(self) -> list[Path]:
        """Delete the partial shards of this cache that no live writer is writing (this slot's,
        and those of slots whose lock is free); return them."""
        removed = []
        for path, holder in partial_shard_status(self.cache_dir, mine=(self.shard_index, self.shard_count)):
            if holder is None:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _other_shard_count_at_work(self) -> tuple[str, str] | None:
        """("j/m", holder) of a held slot lock of this cache with another shard count, if any."""
        for path in sorted(self.cache_dir.glob("extract-*of*.lock")):
            index, count = (int(part) for part in path.stem[len("extract-") :].split("of"))
            if count != self.shard_count and is_held(path):
                return f"{index}/{count}", describe_holder(path)
        return None


def partial_shard_status(cache_dir: Path, mine: tuple[int, int] | None = None) -> list[tuple[Path, str | None]]:
    """Each partial shard of ``cache_dir`` with the writer writing it (``describe_holder``), or
    ``None`` if its slot's lock is free: a killed writer left it. ``mine``, the slot the caller
    holds, counts as free."""
    status = []
    for path in partial_shards(cache_dir):
        slot = slot_of_partial(path)
        lock = lock_path(cache_dir, *slot) if slot else None
        held = slot != mine and lock is not None and lock.exists() and is_held(lock)
        status.append((path, describe_holder(lock) if held else None))
    return status


def is_held(path: Path) -> bool:
    """Whether a process holds the lock ``path``: try to take it without waiting, then let go."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _lock(fd, wait_s=0):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def describe_holder(path: Path) -> str:
    """ "process 1234 on host, since ..." from a lock file (empty if the holder has not written it yet)."""
    try:
        holder = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if "pid" not in holder:
        return "another process (PID not yet recorded)"
    return f"process {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}"


def _lock(fd: int, wait_s: float) -> bool:
    """Take an exclusive ``flock`` on ``fd``, retrying for ``wait_s`` seconds; whether it was taken."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
