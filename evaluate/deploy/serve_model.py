"""The model side of ``serve``: a deployment loaded once (``DeployedModel``: decoding, cropping and
scoring with ``predict_onnx``'s own functions, the deployment's scorer) and the ``Batcher`` that
lets concurrent requests share one encoder call.

Threads, so that the event loop only parses HTTP and JSON:

- decoding, cropping and drawing overlays run on a small pool (``decode_threads``);
- the encoder and head run on one thread of their own, one batch at a time (ONNX Runtime spreads a
  call over the cores itself; two calls at once would only compete for them).

The ``Batcher`` takes the first image waiting, waits up to ``batch_wait_ms`` for more, and scores up
to ``max_batch`` images in one call; the images of a request, and those of requests arriving while
the model is busy, are batched alike. At most ``max_pending`` decoded images wait for the model at
once (their crops are ~12 MB each for ViT-B/16): a request beyond waits before decoding, so memory
stays bounded whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raml.evaluate.deploy import predict_onnx

# The decoders an upload may use: the formats of RAML's image files (extract.datasets.is_image).
# Others (EPS, which runs Ghostscript, among them) are never tried on a stranger's bytes.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
OVERLAY_MAX_SIDE = 1024  # px: the overlay a response carries is drawn at most this large


class ImageRefused(ValueError):
    """An upload that cannot be scored: ``status`` 413 (too many pixels) or 400, ``code`` for clients."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class PreparedImage:
    """One decoded upload, ready for the model."""

    name: str
    category: int
    width: int
    height: int
    crops: np.ndarray  # [21, 3, S, S] float32
    image: object = None  # the PIL image, kept only when a map is drawn
    timings: dict = field(default_factory=dict)  # ms


@dataclass
class Scored:
    score: float
    tokens: np.ndarray  # the image's token map values [T]
    queue_ms: float
    model_ms: float
    batch_images: int


class DeployedModel:
    """The deployment in ``directory``: its deploy.json, and its graphs once ``load`` has run."""

    def __init__(self, directory, max_pixels: int):
        self.directory = Path(directory)
        self.deploy = predict_onnx.read_deployment(self.directory)
        self.max_pixels = max_pixels
        self.encoder = self.head = self._overlay = None

    def load(self) -> None:
        """Open both graphs and the overlay's colour map (slow: run it off the event loop)."""
        import matplotlib  # noqa: F401  (overlay_image's colour maps: imported now, not on the first request)

        from raml.evaluate.overlay import overlay_image

        self.encoder = predict_onnx.open_encoder(self.deploy, self.directory)
        self.head = predict_onnx.open_graph(self.deploy, "head", self.directory)
        self._overlay = overlay_image

    @property
    def categories(self) -> list[str]:
        return self.deploy["categories"]

    def prepare(self, name: str, data: bytes, category: int, keep_image: bool) -> PreparedImage:
        """Decode ``data`` (refused from its header beyond ``max_pixels``) and cut its crops;
        ``ImageRefused`` saying what is wrong with it."""
        start = time.perf_counter()
        deploy = self.deploy
        try:
            image = predict_onnx.load_rgb(
                io.BytesIO(data), deploy["min_image_side"], max_pixels=self.max_pixels, formats=UPLOAD_FORMATS
            )
        except predict_onnx.TooManyPixelsError as err:
            raise ImageRefused(413, "too_many_pixels", f"{name}: {err}") from None
        except Exception as err:  # PIL raises many types for a bad file: each means this upload is bad
            raise ImageRefused(*_decoding_problem(name, err)) from None
        decoded = time.perf_counter()
        crops = predict_onnx.pyramid_pixels(
            image, deploy["input_size"], deploy["mean"], deploy["std"], deploy["crop_layout"]
        )
        timings = {"decode": _ms(decoded - start), "crops": _ms(time.perf_counter() - decoded)}
        return PreparedImage(name, category, image.width, image.height, crops, image if keep_image else None, timings)

    def score(self, batch: list[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
        """s_final [B] and token map values [B, T] of ``batch``, in one encoder call."""
        crops = np.concatenate([item.crops for item in batch])
        return predict_onnx.score_crops(self.encoder, self.head, self.deploy, crops, [i.category for i in batch])

    def grid(self, tokens: np.ndarray) -> np.ndarray:
        geometry = self.deploy["map"]
        return predict_onnx.token_grid(tokens, geometry["tiles"], geometry["per_tile"])

    def overlay_png(self, image, tokens: np.ndarray) -> bytes:
        """PNG of the image with its anomaly map over it, at most ``OVERLAY_MAX_SIDE`` px a side (the
        map is computed at that size, from the same token scores)."""
        from PIL import Image

        scale = min(1.0, OVERLAY_MAX_SIDE / max(image.size))
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        shown = image if scale == 1.0 else image.resize((width, height), Image.BILINEAR)
        geometry = self.deploy["map"]
        anomaly = predict_onnx.anomaly_map(tokens, height, width, geometry["tiles"], geometry["per_tile"])
        buffer = io.BytesIO()
        self._overlay(shown, anomaly).save(buffer, format="PNG")
        return buffer.getvalue()


def _decoding_problem(name: str, err: Exception) -> tuple[int, str, str]:
    """(HTTP status, code, message) of an upload that PIL or ``load_rgb`` could not decode."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        accepted = ", ".join(UPLOAD_FORMATS)
        return 400, "not_an_image", f"{name}: not an image in an accepted format ({accepted})"
    if isinstance(err, Image.DecompressionBombError):
        return 413, "too_many_pixels", f"{name}: {err}"
    if "truncated" in str(err) or isinstance(err, EOFError):
        return 400, "truncated_image", f"{name}: the image file is truncated ({type(err).__name__}: {err})"
    if "too small" in str(err):
        return 400, "image_too_small", f"{name}: {err}"
    return 400, "undecodable_image", f"{name}: cannot be decoded ({type(err).__name__}: {err})"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Batcher:
    """Scores ``PreparedImage``s submitted from the event loop in shared model calls (module docstring)."""

    def __init__(self, model: DeployedModel, max_batch: int, batch_wait_ms: float, max_pending: int):
        self.model, self.max_batch, self.wait_s = model, max_batch, batch_wait_ms / 1000
        self.pending = asyncio.Semaphore(max_pending)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="raml-model")
        self.task: asyncio.Task | None = None
        self.calls = self.images = 0  # model calls made and images scored, for /health

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.model_thread.shutdown(wait=True)

    async def score(self, item: PreparedImage) -> Scored:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            live = [entry for entry in batch if not entry[1].done()]  # a client that went away is dropped
            if live:
                await self._score(loop, live)

    async def _score(self, loop, batch) -> None:
        start = time.perf_counter()
        try:
            finals, tokens = await loop.run_in_executor(self.model_thread, self.model.score, [e[0] for e in batch])
        except Exception as err:  # the model failed on this batch: each request answers with it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(err)
            return
        model_ms = _ms(time.perf_counter() - start)
        self.calls, self.images = self.calls + 1, self.images + len(batch)
        for i, (_, future, queued) in enumerate(batch):
            if not future.done():
                future.set_result(Scored(float(finals[i]), tokens[i], _ms(start - queued), model_ms, len(batch)))
