"""Stage one's loader: decode and crop images in worker processes, hand the crops to the encoder.

The hand-over is what sets stage one's speed once the encoder is fast (a GPU was measured
idle 90 % of the time behind the first loader), so each step is chosen for it:

- **Image by image.** ``DataLoader`` workers each take one image at a time (``batch_size=None``),
  so ``W`` workers decode ``W`` images at once whatever the batch size; batches are put together
  here, in the order the sampler gives, which keeps them deterministic.
- **uint8 crops in shared memory.** A worker writes an image's 21 crops (``pyramid_crops``:
  3.2 MB for ViT-B/16, a quarter of float32) straight into a slot of a uint8 tensor in shared
  memory that every process maps, and returns only the slot's number. Nothing is pickled or
  copied between processes; a new shared tensor per image would cost a copy, a file descriptor
  sent over a socket and fresh page faults, per image.
- **Bounded.** The slots are a ring: image ``i`` goes to slot ``i % n_slots``. ``DataLoader`` has
  at most ``workers x prefetch`` images dispatched beyond the last one it returned, and this
  loader copies a batch out of its slots as soon as the batch is complete, so ``n_slots =
  workers x prefetch + batch size`` never lets a worker overwrite a slot still to be read (each
  slot records which image wrote it last, and reading checks it). Memory does not grow with the
  dataset: the slots, one batch being staged, one waiting, one being encoded.
- **Staged ahead of use.** A background thread copies each complete batch out of the slots (into
  pinned memory on CUDA) and starts its copy to the device on a side stream, so that it overlaps
  the previous batch's forward pass; ``normalise_crops`` then runs on the device.
"""

from __future__ import annotations

import math
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from raml.cache import N_CROPS
from raml.errors import UserError
from raml.extract.datasets import ImageRecord
from raml.extract.pyramid import BadImageError, load_rgb, pyramid_crops, token_targets

STAGED_BATCHES = 1  # staged batches that may wait for the encoder (one more is being encoded)
_POLL_SECONDS = 0.1  # how often a blocked staging thread checks whether it should stop
_SHARED_MEMORY = Path("/dev/shm")  # where torch's shared tensors live on Linux


def worker_start_method() -> str | None:
    """How decoding workers start: the platform's default (forked on Linux: fast), unless OpenVINO
    is loaded in this process. Its runtime keeps threads and state that a forked child inherits
    half-way (a worker forked after an OpenVINO engine ran crashed with SIGSEGV), so the workers then
    start from a fresh server process ("forkserver"), which costs each an import of torch."""
    return "forkserver" if "openvino" in sys.modules else None


def prefetch_per_worker(batch_size: int, workers: int) -> int:
    """Images each worker may hold ready: together about one batch, and at least two each."""
    return max(2, math.ceil(batch_size / max(workers, 1)))


def slot_count(batch_size: int, workers: int, prefetch: int) -> int:
    """Slots that no worker can overwrite before they are read: the images ``DataLoader`` may have
    dispatched beyond the last it returned, plus the batch being filled (see the module docstring)."""
    return workers * prefetch + batch_size


@dataclass
class CroppedImage:
    """One record after decoding: the slot holding its crops and its size, or why it is bad."""

    index: int  # position in the list of records being encoded
    slot: int | None = None  # where its crops are, in the loader's shared slots
    size: tuple | None = None  # (height, width) of the original image
    reason: str | None = None  # set (and slot None) when the file cannot be decoded
    targets: tuple | None = None  # with patch tokens: ``extract.pyramid.token_targets`` (from its mask)


@dataclass
class CropBatch:
    """One batch of records, in order; ``crops`` holds the good ones' crops, on the device."""

    images: list  # CroppedImage
    crops: torch.Tensor | None  # uint8 [21 x good images, 3, S, S]; None when none is good

    @property
    def good(self) -> list:
        return [image for image in self.images if image.reason is None]

    @property
    def bad(self) -> list:
        return [image for image in self.images if image.reason is not None]


class _CropDataset(Dataset):
    """Decodes one record into its 21 uint8 crops, written into a shared slot, in a DataLoader worker;
    with ``per_tile`` (patch tokens), also reads its mask into the tokens' targets."""

    def __init__(
        self,
        root: Path,
        records: list[ImageRecord],
        size: int,
        slots: torch.Tensor,
        writers: torch.Tensor,
        per_tile: int | None,
    ):
        self.root, self.records, self.size, self.slots, self.writers = root, records, size, slots, writers
        self.per_tile = per_tile

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CroppedImage:
        slot = index % len(self.slots)
        self.writers[slot] = index  # before the pixels: a reader that sees its own index read them whole
        record = self.records[index]
        try:
            image = load_rgb(self.root / record.relpath)
            targets = (
                None
                if self.per_tile is None
                else token_targets(self.root, record, image.height, image.width, self.per_tile)
            )
        except BadImageError as err:
            return CroppedImage(index, reason=err.reason)
        pyramid_crops(image, self.size, out=self.slots[slot].permute(0, 3, 1, 2))
        return CroppedImage(index, slot, (image.height, image.width), targets=targets)


class CropBatches:
    """Iterate the ``CropBatch``es of ``records``, batch ``i`` holding the records ``batches[i]``.

    ``batches`` must list ``0 .. len(records) - 1`` in order, cut into consecutive runs. The
    records are decoded by ``workers`` processes (0: in the staging thread) and each batch is
    staged on ``device`` ahead of use; with ``per_tile`` (patch tokens of that many cells a tile
    side), each image's mask targets come with it (``CroppedImage.targets``). Use as a context
    manager: leaving it stops the workers. Raises ``UserError`` when the shared memory cannot hold
    the slots.
    """

    def __init__(
        self,
        root: Path,
        records: list[ImageRecord],
        batches: list[list[int]],
        size: int,
        *,
        workers: int,
        device: torch.device,
        per_tile: int | None = None,
    ):
        if [i for batch in batches for i in batch] != list(range(len(records))):
            raise ValueError("batches must cover the records once, in order")
        self.device = torch.device(device)
        batch_size = max(map(len, batches), default=1)
        prefetch = prefetch_per_worker(batch_size, workers)
        n_slots = min(len(records), slot_count(batch_size, workers, prefetch)) or 1
        self._slots = _shared_uint8((n_slots, N_CROPS, size, size, 3), workers)
        self._writers = torch.full((n_slots,), -1, dtype=torch.int64)
        if workers:
            self._writers.share_memory_()
        loader = DataLoader(
            _CropDataset(Path(root), records, size, self._slots, self._writers, per_tile),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=prefetch if workers else None,
            multiprocessing_context=worker_start_method() if workers else None,
        )
        images = iter(loader)  # starts the workers now, from this thread, before any other thread starts
        self._queue: queue.Queue = queue.Queue(maxsize=STAGED_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._stage_all, args=(images, [len(b) for b in batches]), name="raml-crop-stager", daemon=True
        )
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

    def __enter__(self) -> CropBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stage_all(self, images, sizes: list[int]) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            for size in sizes:
                if not self._put(self._stage([next(images) for _ in range(size)], stream)):
                    return
            self._put(None)
        except BaseException as err:  # surfaces in the consuming thread, with its traceback
            self._put(err)

    def _stage(self, images: list[CroppedImage], stream) -> tuple[CropBatch, object]:
        """Copy the good images' crops out of their slots, then start their copy to the device."""
        slots = [image.slot for image in images if image.reason is None]
        if not slots:
            return CropBatch(images, None), None
        staged = torch.empty((len(slots), *self._slots.shape[1:]), dtype=torch.uint8, pin_memory=stream is not None)
        torch.index_select(self._slots, 0, torch.tensor(slots), out=staged)
        overwritten = [
            image.index for image in images if image.reason is None and int(self._writers[image.slot]) != image.index
        ]
        if overwritten:
            raise RuntimeError(
                f"loader slots of images {overwritten} were overwritten before they were read: "
                "DataLoader dispatched more images ahead than its prefetch bound"
            )
        size = staged.shape[-2]
        crops = staged.view(-1, size, size, 3).permute(0, 3, 1, 2)  # [N, 3, S, S], channels-last in memory
        if stream is None:
            return CropBatch(images, crops.to(self.device)), None
        with torch.cuda.stream(stream):
            # Pinned and non-blocking: the copy overlaps the forward pass running on the default
            # stream; the caching host allocator keeps ``staged`` until the copy has finished.
            on_device = crops.to(self.device, non_blocking=True)
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


def _shared_uint8(shape: tuple, workers: int) -> torch.Tensor:
    """A uint8 tensor, in shared memory when there are ``workers`` (a ``UserError`` first if
    /dev/shm is too small for it)."""
    if not workers:
        return torch.empty(shape, dtype=torch.uint8)
    need = math.prod(shape)
    if _SHARED_MEMORY.is_dir():
        free = shutil.disk_usage(_SHARED_MEMORY).free
        if free < need:
            raise UserError(
                f"extract needs {need / 2**20:.0f} MB of shared memory for its workers' crops; "
                f"{_SHARED_MEMORY} has {free / 2**20:.0f} MB free. In Docker, run with --ipc=host or "
                "--shm-size=2g; or pass fewer --workers, a smaller --batch-size, or --workers 0."
            )
    return torch.empty(shape, dtype=torch.uint8).share_memory_()
