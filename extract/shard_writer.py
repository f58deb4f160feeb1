"""Finished shards written in a background thread, so that the encoder does not wait for HDF5 and
fsync."""

from __future__ import annotations

import queue
import threading


class ShardWriter:
    """Writes finished shards in a background thread, in the order submitted, so that the encoder
    does not wait for HDF5 and fsync; at most ``WAITING_SHARDS`` finished shards wait in memory.

    Leaving the context writes every shard submitted before (also when an error is propagating:
    they are complete), then raises the first error of a write, if any.
    """

    WAITING_SHARDS = 1

    def __init__(self, write):
        self._write, self._error = write, None
        self._queue: queue.Queue = queue.Queue(maxsize=self.WAITING_SHARDS)
        self._thread = threading.Thread(target=self._write_all, name="raml-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, *job) -> None:
        """Queue ``write(*job)``."""
        if self._error is not None:
            raise self._error
        self._queue.put(job)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc is not self._error:
            raise self._error

    def _write_all(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:  # after a failed write, the rest is dropped: a re-run redoes it
                try:
                    self._write(*job)
                except BaseException as err:  # re-raised in the submitting thread
                    self._error = err
