"""Writing files so that a reader sees the old file or the new one, never a part of one, and a
failed write is one clear error.

Every file the project writes goes through here: the content is written to a temporary file
beside the target, flushed and fsync'ed, renamed over the target (``os.replace``) and the
directory fsync'ed, so that a crash or a ``kill -9`` at any point leaves the previous file or none.
Content that a library would write itself (HDF5 shards, torch checkpoints, PNG plots) is
serialised in memory first and written by Python here: a full or read-only disk then surfaces as
an ``OSError`` of our own write, never inside a C library (HDF5, writing a shard onto a full disk
itself, raised in object destructors and crashed the process with a segmentation fault).

A write that fails for a reason the user can fix (``WRITE_FAULTS``: a full disk, an exhausted
quota, a file-size limit, a read-only file system, no permission) becomes a ``WriteError``: one
line naming the path, the cause in words and what to do. ``cache.cli.fail_cleanly`` turns the
same faults into that line wherever else they happen (a lock file, a directory to create).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from raml.errors import UserError

_RETRY = "then run the same command again (extract and sweep keep what they finished)"
# errno → (the cause in words, what to do)
WRITE_FAULTS = {
    errno.ENOSPC: ("no space left on the device", f"free some space or write elsewhere, {_RETRY}"),
    errno.EDQUOT: ("the disk quota is exhausted", f"free some of your files or write elsewhere, {_RETRY}"),
    errno.EFBIG: (
        "the file is larger than the file system or the file-size limit (ulimit -f) allows",
        f"raise the limit or write to another file system, {_RETRY}",
    ),
    errno.EROFS: ("the file system is read-only", "write to a directory on a writable disk"),
    errno.EACCES: ("permission denied", "write to a directory you may write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "write to a directory you may write to, or change its permissions"),
}


class WriteError(UserError):
    """A file could not be written for a reason the user can fix (``WRITE_FAULTS``)."""


def write_fault(err: BaseException, path=None) -> WriteError | None:
    """The ``WriteError`` that ``err`` means, naming ``path`` (default: the file the OS names), or
    ``None`` when neither ``err`` nor an exception it was raised from (a library may wrap the
    ``OSError`` of its write in its own type) is an ``OSError`` of ``WRITE_FAULTS``."""
    while err is not None and not (isinstance(err, OSError) and err.errno in WRITE_FAULTS):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    cause, advice = WRITE_FAULTS[err.errno]
    return WriteError(f"{path or err.filename or 'a file'}: cannot write: {cause}. {advice[0].upper()}{advice[1:]}.")


@contextlib.contextmanager
def reporting_write_faults(path):
    """Turn an ``OSError`` of ``WRITE_FAULTS`` raised inside into a ``WriteError`` naming ``path``."""
    try:
        yield
    except OSError as err:
        fault = write_fault(err, path)
        if fault is None:
            raise
        raise fault from err


def user_cache_root() -> Path:
    """RAML's user cache (the backbone identity memo, ONNX exports, logs of unexpected errors):
    ``$RAML_CACHE_DIR``, else ``$XDG_CACHE_HOME/raml``, else ``~/.cache/raml``."""
    if os.environ.get("RAML_CACHE_DIR"):
        return Path(os.environ["RAML_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "raml"


def atomic_write(path: Path, write, *, tmp: Path | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (default ``.<name>.<pid>.tmp``), then
    move it into place (``move_into_place``): readers see the old file or the new one, never a
    part, and nothing is left behind on failure. Raises ``WriteError`` for ``WRITE_FAULTS``."""
    path = Path(path)
    tmp = Path(tmp) if tmp else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with reporting_write_faults(path):
            write(tmp)
            move_into_place(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
    atomic_write(path, lambda target: target.write_bytes(data), tmp=tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda target: target.write_text(text, encoding="utf-8"))


def move_into_place(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` (complete, written by us or by a library), rename it over ``path``, fsync the
    directory: after this returns, ``path`` survives a crash."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def make_dirs(path) -> Path:
    """``mkdir -p path``; a ``WriteError`` naming it when that is not allowed."""
    path = Path(path)
    with reporting_write_faults(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def create_exclusively(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (then leave it as it is), atomically: a
    complete temporary file is hard-linked into place, which fails if ``path`` exists. Returns
    whether this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with reporting_write_faults(path):
            tmp.write_text(text, encoding="utf-8")
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_dir(path.parent)
            return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def remove_durably(path: Path) -> None:
    """Delete ``path`` and fsync its directory, so that the deletion survives a crash."""
    with reporting_write_faults(path):
        Path(path).unlink()
        fsync_dir(Path(path).parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a rename in it survives a crash (a no-op where the file system
    cannot fsync directories)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def read_json_checked(path, problem=None, *, error=UserError, advice: str = ""):
    """The JSON value in ``path``; ``error`` naming the file when it is not UTF-8 JSON or when
    ``problem(value)`` says why it is not what the caller reads (``advice``: appended to either)."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}){advice}") from None
    reason = problem(value) if problem else None
    if reason:
        raise error(f"{path}: {reason}{advice}")
    return value
