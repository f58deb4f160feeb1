"""``serve``: a deployment (``raml export``) over HTTP, on Starlette and uvicorn.

    GET  /           a page: drop an image, pick the category, see score, decision and overlay
    GET  /health     200 {"status": "ready"} once the models are loaded; 503 while loading (or failed)
    GET  /v1/info    what deploy.json says: backbone, categories, thresholds (and their sources), precision
    POST /v1/score   images (multipart field ``image``, one or more; or the raw bytes with an image
                     content type) and a category (form field or query ``category``) → JSON per image:
                     score, decision, threshold and its source, timings; ``map=overlay`` adds a PNG
                     overlay (base64), ``map=grid`` the raw token grid

Why Starlette and uvicorn: the service is a handful of routes over one shared model, so a small
ASGI toolkit (Starlette: routing, multipart parsing with python-multipart, no validation layer to
carry) on the reference ASGI server (uvicorn: HTTP/1.1 keep-alive, and on SIGTERM it stops
accepting, lets the requests in flight finish, then exits) is all it needs; an asyncio event loop
lets concurrent requests meet in the ``Batcher`` (serve_model.py) without a lock.

Safe by default (``ServeSettings``): the CLI listens on 127.0.0.1 unless told otherwise and needs a
bearer token to listen beyond the loopback; with a token, every /v1/ request must carry it
(``Authorization: Bearer``). Without one, only Host headers naming the loopback are answered (a
web page elsewhere cannot reach the service through DNS rebinding), and a browser request from
another origin is refused. A body larger than ``max_upload_bytes`` is refused from its
Content-Length or as it streams in; an image of more than ``max_pixels`` from its header, before it
is decoded. Uploads are held in memory (multipart parts over 1 MB spill to an anonymous temporary
file), never written under a name the client chose. Every response carries ``Raml-Random-Weights``
and, in JSON, ``random_weights`` (with the warning when true).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from raml.evaluate.deploy import predict_onnx
from raml.evaluate.deploy.serve_model import Batcher, DeployedModel, ImageRefused, Scored
from raml.evaluate.deploy.serve_settings import ServeSettings

log = logging.getLogger("raml.serve")
PAGE_DIR = Path(__file__).with_name("serve_page")
# Content types of a raw upload (the body is the image); anything else that is not multipart is refused.
RAW_IMAGE_TYPES = {"image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "application/octet-stream"}
MAP_KINDS = ("none", "overlay", "grid")
MAX_FORM_FIELDS = 8  # category, map and a few spare: a form with more is not ours


class RequestError(Exception):
    """A request the service refuses: HTTP ``status``, a stable ``code`` and a message in words."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Service:
    """What the routes share: the model, its loading state, the batcher and the settings."""

    def __init__(self, deploy_dir, settings: ServeSettings, on_load_failed=None):
        self.settings = settings
        self.model = DeployedModel(deploy_dir, settings.max_pixels)
        self.deploy = self.model.deploy
        self.state, self.error = "loading", None
        self.on_load_failed = on_load_failed
        self.workers = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="raml-decode")
        self.batcher: Batcher | None = None
        self.started = time.time()

    def stamp(self, payload: dict) -> dict:
        """``payload`` with the random-weights flag (and its warning) that every JSON answer carries."""
        stamp = {"random_weights": bool(self.deploy["random_weights"])}
        if self.deploy["random_weights"]:
            stamp["warning"] = self.deploy["warning"]
        return {**payload, **stamp}

    def answer(self, payload: dict, status: int = 200, headers=None) -> JSONResponse:
        return JSONResponse(self.stamp(payload), status, headers={"Cache-Control": "no-store", **(headers or {})})

    def refuse(self, err: RequestError, headers=None) -> JSONResponse:
        if err.code == "upload_too_large":  # the rest of the body is never read: the connection cannot go on
            headers = {**(headers or {}), "Connection": "close"}
        return self.answer({"error": {"code": err.code, "message": err.message}}, err.status, headers)

    async def load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.workers, self.model.load)
        except Exception as err:  # a graph ONNX Runtime refuses: say so, /health says failed
            self.state, self.error = "failed", f"{type(err).__name__}: {err}"
            log.error("the deployment could not be loaded: %s", self.error)
            if self.on_load_failed:
                self.on_load_failed(self.error)
            return
        self.batcher = Batcher(
            self.model, self.settings.max_batch, self.settings.batch_wait_ms, self.settings.max_pending
        )
        self.batcher.start()
        self.state = "ready"
        log.info("ready: %s, categories %s", self.deploy["backbone"], ", ".join(self.model.categories))

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.workers.shutdown(wait=True)

    def thresholds(self) -> dict:
        return {
            c: dict(zip(("value", "source"), predict_onnx.threshold_for(self.deploy, c))) for c in self.model.categories
        }


async def page(request: Request):
    return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-store"})


async def page_asset(request: Request):
    name = request.path_params["name"]
    if name not in ("page.js", "page.css"):
        return request.app.state.service.refuse(RequestError(404, "not_found", f"no page asset {name}"))
    return FileResponse(PAGE_DIR / name, headers={"Cache-Control": "no-store"})


async def health(request: Request):
    service: Service = request.app.state.service
    body = {"status": service.state, "uptime_s": round(time.time() - service.started, 1)}
    if service.error:
        body["error"] = service.error
    if service.batcher is not None:
        body.update(model_calls=service.batcher.calls, images_scored=service.batcher.images)
    return service.answer(body, 200 if service.state == "ready" else 503)


async def info(request: Request):
    service: Service = request.app.state.service
    deploy, settings = service.deploy, service.settings
    return service.answer(
        {
            "backbone": deploy["backbone"],
            "weights": deploy["weights"],
            "precision": deploy["precision"],
            "categories": service.model.categories,
            "thresholds": service.thresholds(),
            "score_weights": deploy["score_weights"],
            "map": deploy["map"]["kind"],
            "input_size": deploy["input_size"],
            "exported": deploy.get("exported"),
            "checkpoint_sha256": deploy.get("checkpoint_sha256"),
            "status": service.state,
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "max_images_per_request": settings.max_images,
                "formats": ["PNG", "JPEG", "BMP", "TIFF", "WEBP"],
            },
            "batching": {"max_batch": settings.max_batch, "batch_wait_ms": settings.batch_wait_ms},
        }
    )


async def score(request: Request):
    service: Service = request.app.state.service
    start = time.perf_counter()
    try:
        if service.state != "ready":
            raise RequestError(
                503, "not_ready", f"the models are {service.state}; GET /health says when they are ready"
            )
        images, fields = await _read_upload(request, service.settings)
        category = _category(fields.get("category") or request.query_params.get("category"), service)
        map_kind = fields.get("map") or request.query_params.get("map") or "none"
        if map_kind not in MAP_KINDS:
            raise RequestError(400, "bad_map", f"map={map_kind!r}: expected one of {', '.join(MAP_KINDS)}")
        index = service.model.categories.index(category)
        results = await asyncio.gather(*(_score_one(service, n, d, index, map_kind) for n, d in images))
    except RequestError as err:
        return service.refuse(err)
    threshold, source = predict_onnx.threshold_for(service.deploy, category)
    for result in results:
        result.update(category=category, threshold=threshold, threshold_source=source)
        result["decision"] = "anomalous" if result["score"] >= threshold else "normal"
    elapsed = round((time.perf_counter() - start) * 1000, 2)
    return service.answer({"category": category, "results": results, "timings_ms": {"request": elapsed}})


async def _score_one(service: Service, name: str, data: bytes, index: int, map_kind: str) -> dict:
    loop = asyncio.get_running_loop()
    async with service.batcher.pending:  # bounded memory: at most max_pending decoded images wait
        try:
            item = await loop.run_in_executor(
                service.workers, service.model.prepare, name, data, index, map_kind == "overlay"
            )
        except ImageRefused as err:
            raise RequestError(err.status, err.code, str(err)) from None
        scored: Scored = await service.batcher.score(item)
    timings = {**item.timings, "queue": scored.queue_ms, "model": scored.model_ms}
    result = {"name": name, "score": scored.score, "width": item.width, "height": item.height}
    if map_kind == "overlay":
        map_start = time.perf_counter()
        png = await loop.run_in_executor(service.workers, service.model.overlay_png, item.image, scored.tokens)
        result["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        timings["map"] = round((time.perf_counter() - map_start) * 1000, 2)
    elif map_kind == "grid":
        geometry = service.deploy["map"]
        result["grid"] = service.model.grid(scored.tokens).astype(np.float64).round(6).tolist()
        result["grid_geometry"] = {
            "tiles": geometry["tiles"],
            "per_tile": geometry["per_tile"],
            "is": geometry["geometry"],
        }
    result["timings_ms"] = {**timings, "batch_images": scored.batch_images}
    return result


def _category(value, service: Service) -> str:
    categories = service.model.categories
    if value is None or value == "":
        if len(categories) == 1:
            return categories[0]
        raise RequestError(400, "missing_category", f"the field category is missing: one of {', '.join(categories)}")
    if not isinstance(value, str) or value not in categories:
        shown = value if isinstance(value, str) else "a file"
        raise RequestError(
            400, "unknown_category", f"category {shown[:100]!r}: not in this deployment; one of {', '.join(categories)}"
        )
    return value


async def _read_upload(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], dict]:
    """[(name, bytes)] of the uploaded images and the form's text fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data" and content_type not in RAW_IMAGE_TYPES:
        raise RequestError(
            415,
            "unsupported_content_type",
            f"Content-Type {content_type or 'missing'}: send multipart/form-data with a field image, or the "
            f"image itself as {', '.join(sorted(RAW_IMAGE_TYPES))}",
        )
    body = bytearray()
    async for chunk in request.stream():  # the Content-Length was checked already; a chunked body is counted here
        body += chunk
        if len(body) > settings.max_upload_bytes:
            raise RequestError(
                413, "upload_too_large", f"the upload is larger than {settings.max_upload_bytes:,} bytes"
            )
    if content_type != "multipart/form-data":
        if not body:
            raise RequestError(400, "missing_image", "the request body is empty: it should be the image")
        return [("image", bytes(body))], {}
    return await _parse_form(request.headers, bytes(body), settings)


async def _parse_form(headers: Headers, body: bytes, settings: ServeSettings):
    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            headers, stream(), max_files=settings.max_images, max_fields=MAX_FORM_FIELDS
        ).parse()
    except MultiPartException as err:
        raise RequestError(400, "bad_form", f"the multipart form cannot be read: {err.message}") from None
    images, fields = [], {}
    try:
        for key, value in form.multi_items():
            if key == "image" and isinstance(value, UploadFile):
                images.append((_client_name(value.filename, len(images)), await value.read()))
            elif key in ("category", "map") and isinstance(value, str):
                fields[key] = value
            else:
                kind = "file" if isinstance(value, UploadFile) else "text field"
                raise RequestError(
                    400,
                    "unexpected_field",
                    f"unexpected {kind} {key[:50]!r}: the fields are image (files), category and map",
                )
    finally:
        await form.close()
    if not images:
        raise RequestError(400, "missing_image", "the field image is missing: attach one or more image files as image")
    if any(not data for _, data in images):
        raise RequestError(400, "missing_image", "an image part is empty")
    return images, fields


def _client_name(filename: str | None, position: int) -> str:
    """The client's file name, only to be echoed back (never used as a path): printable, at most 100 characters."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable())[:100]
    return name or f"image {position + 1}"


def create_app(deploy_dir, settings: ServeSettings | None = None, on_load_failed=None) -> Starlette:
    """The service's ASGI app over the deployment in ``deploy_dir``: it answers at once and loads the
    models in the background (``/health`` says when they are ready). ``ValueError`` when deploy.json
    is missing or of another format; ``on_load_failed(message)`` is called if the graphs fail to load."""
    from contextlib import asynccontextmanager

    from starlette.exceptions import HTTPException

    from raml.evaluate.deploy.serve_guard import Guard

    service = Service(deploy_dir, settings or ServeSettings(), on_load_failed)

    @asynccontextmanager
    async def lifespan(app):
        loading = asyncio.get_running_loop().create_task(service.load())
        yield
        await loading
        await service.close()

    async def http_error(request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return service.refuse(RequestError(err.status_code, code, f"{request.method} {request.url.path}: {err.detail}"))

    async def server_error(request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return service.refuse(RequestError(500, "internal_error", f"{type(err).__name__}: {err}"))

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/page/{name}", page_asset),
            Route("/health", health),
            Route("/v1/info", info),
            Route("/v1/score", score, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.service = service
    return Guard(app, service)
