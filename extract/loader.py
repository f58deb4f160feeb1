"""Stage one's loader: decode and crop images in worker processes, hand the crops to the encoder.

The hand-over is what sets stage one's speed once the encoder is fast (issue 8 measured a GPU
idle 90 % of the time behind the old loader), so each step is chosen for it:

- **Image by image.** ``DataLoader`` workers each take one image at a time (``batch_size=None``),
  so ``W`` workers decode ``W`` images at once whatever the batch size; the batches the encoder
  sees are put together here, in the order the sampler gives, which keeps them deterministic.
- **uint8 tensors through shared memory.** A worker returns an image's 21 crops as one uint8
  tensor (``pyramid_crops``: 3.2 MB for ViT-B/16, a quarter of float32); torch moves tensors
  between processes through shared memory, where numpy arrays would be pickled through a pipe.
- **Bounded.** Each worker holds at most ``prefetch`` images, the staging thread one batch, and
  one staged batch waits for the encoder: memory does not grow with the dataset.
- **Staged ahead of use.** A background thread puts each batch together (in pinned memory on
  CUDA) and starts its copy to the device on a side stream, so that it overlaps the previous
  batch's forward pass; ``normalise_crops`` then runs on the device, in ``encode_crops``.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cache import N_CROPS
from extract.datasets import ImageRecord
from extract.pyramid import BadImageError, load_rgb, pyramid_crops

STAGED_BATCHES = 1      # staged batches that may wait for the encoder (one more is being encoded)
_POLL_SECONDS = 0.1     # how often a blocked staging thread checks whether it should stop


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class CroppedImage:
    """One record after decoding: its crops and size, or why it could not be decoded."""

    index: int                          # position in the list of records being encoded
    crops: torch.Tensor | None = None   # uint8 [21, 3, S, S]
    size: tuple | None = None           # (height, width) of the original image
    reason: str | None = None           # set (and crops None) when the file is bad


@dataclass
class CropBatch:
    """One batch of records, in order; ``crops`` holds the good ones' crops, on the device."""

    images: list                        # CroppedImage, crops dropped once staged
    crops: torch.Tensor | None          # uint8 [21 x good images, 3, S, S]; None when none is good

    @property
    def good(self) -> list:
        return [image for image in self.images if image.reason is None]

    @property
    def bad(self) -> list:
        return [image for image in self.images if image.reason is not None]


class _CropDataset(Dataset):
    """Decodes one record into its 21 uint8 crops, in a DataLoader worker."""

    def __init__(self, root: Path, records: list[ImageRecord], size: int):
        self.root, self.records, self.size = root, records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CroppedImage:
        try:
            image = load_rgb(self.root / self.records[index].relpath)
        except BadImageError as err:
            return CroppedImage(index, reason=err.reason)
        return CroppedImage(index, pyramid_crops(image, self.size), (image.height, image.width))


def prefetch_per_worker(batch_size: int, workers: int) -> int:
    """Images each worker may hold ready: together about one batch, and at least two each."""
    return max(2, math.ceil(batch_size / max(workers, 1)))


class CropBatches:
    """Iterate the ``CropBatch``es of ``records``, batch ``i`` holding the records ``batches[i]``.

    ``batches`` must list ``0 .. len(records) - 1`` in order, cut into consecutive runs. The
    records are decoded by ``workers`` processes (0: in the staging thread) and each batch is
    staged on ``device`` ahead of use. Use as a context manager: leaving it stops the workers.
    """

    def __init__(self, root: Path, records: list[ImageRecord], batches: list[list[int]], size: int, *,
                 workers: int, device: torch.device):
        if [i for batch in batches for i in batch] != list(range(len(records))):
            raise ValueError("batches must cover the records once, in order")
        self.device = torch.device(device)
        loader = DataLoader(_CropDataset(Path(root), records, size), batch_size=None, shuffle=False,
                            num_workers=workers, prefetch_factor=prefetch_per_worker(
                                max(map(len, batches), default=1), workers) if workers else None)
        images = iter(loader)  # forks the workers now, from this thread, before any other starts
        self._queue: queue.Queue = queue.Queue(maxsize=STAGED_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stage_all, args=(images, [len(b) for b in batches]),
                                        name="raml-crop-stager", daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            batch, ready = item
            if ready is not None:  # the copy ran on the staging stream; the encoder's stream waits for it
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ready)
                batch.crops.record_stream(stream)
            yield batch

    def close(self) -> None:
        """Stop staging and let the workers go (they are shut down with the iterator)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> "CropBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stage_all(self, images, sizes: list[int]) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            for size in sizes:
                batch = [next(images) for _ in range(size)]
                if not self._put(self._stage(batch, stream)):
                    return
            self._put(None)
        except BaseException as err:  # surfaces in the consuming thread, with its traceback
            self._put(err)

    def _stage(self, images: list[CroppedImage], stream) -> tuple[CropBatch, object]:
        """Concatenate the good images' crops, then start their copy to the device."""
        crops = [image.crops for image in images if image.reason is None]
        for image in images:
            image.crops = None  # the batch tensor holds the pixels from here on
        if not crops:
            return CropBatch(images, None), None
        size = crops[0].shape[-1]
        staged = torch.empty((len(crops) * N_CROPS, 3, size, size), dtype=torch.uint8,
                             memory_format=torch.channels_last, pin_memory=stream is not None)
        torch.cat(crops, out=staged)
        if stream is None:
            return CropBatch(images, staged.to(self.device)), None
        with torch.cuda.stream(stream):
            # Pinned and non-blocking: the copy overlaps the forward pass running on the default
            # stream; the caching host allocator keeps ``staged`` until the copy has finished.
            on_device = staged.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return CropBatch(images, on_device), ready

    def _put(self, item) -> bool:
        """Hand ``item`` to the consumer, waiting while the queue is full; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False
