"""Writing files so that a reader sees the old file or the new one, never a part of one.

Every file the project writes goes through here: a temporary file beside the target, flushed and
fsync'ed, then renamed over it (``os.replace``), and the directory fsync'ed, so that a crash or a
``kill -9`` at any point leaves the previous file or none, and nothing half-written.
"""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place, so that
    readers see the old file or the new one, never a part (and nothing is left on failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_exclusively(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` unless it exists (then leave it as it is), atomically: a
    complete temporary file is hard-linked into place, which fails if ``path`` exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
