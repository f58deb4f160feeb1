"""``Guard``: what every request to ``serve`` passes before a route sees it (serve.py's "safe by
default"): the Host header on a loopback service, the origin of a browser's request, the bearer
token, the declared size of the body; and the headers every response carries."""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from raml.evaluate.deploy.serve import RequestError, Service
from raml.evaluate.deploy.serve_settings import is_loopback

# The page loads its script and style from the service and shows overlays as data: URLs; nothing
# else, and no one may frame it.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'"


class Guard:
    """ASGI middleware in front of the app (module docstring)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        random = b"true" if service.deploy["random_weights"] else b"false"
        self.headers = [
            (b"raml-random-weights", random),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
        ]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_stamped(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        problem = self.problem(scope, Headers(scope=scope))
        if problem is None:
            await self.app(scope, receive, send_stamped)
            return
        extra = {"WWW-Authenticate": 'Bearer realm="raml"'} if problem.status == 401 else None
        await self.service.refuse(problem, extra)(scope, receive, send_stamped)

    def problem(self, scope, headers: Headers) -> RequestError | None:
        settings, path = self.service.settings, scope["path"]
        host = headers.get("host", "")
        if settings.loopback_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return RequestError(
                421, "bad_host", f"Host {host[:100]!r}: this service answers only to 127.0.0.1 or localhost"
            )
        origin = headers.get("origin")
        if origin is not None and path.startswith("/v1/") and urlsplit(origin).netloc != host:
            return RequestError(
                403, "cross_origin", f"a request from the page at {origin[:100]} is refused: another origin"
            )
        if settings.token is not None and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
                what = "is missing" if not given else "is not the service's token"
                return RequestError(401, "unauthorized", f"the bearer token {what}: send Authorization: Bearer TOKEN")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            return RequestError(
                413,
                "upload_too_large",
                f"the upload ({int(length):,} bytes) is larger than {settings.max_upload_bytes:,} bytes",
            )
        return None
