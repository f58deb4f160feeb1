"""Running ``serve``: the listening socket, uvicorn, and a clean stop.

The socket is bound here, before uvicorn starts, so that a port in use is one clear error and
``--port 0`` (any free port, as ``bench serve`` uses) prints the port it got. On SIGTERM or
Ctrl-C, uvicorn stops accepting connections, closes idle ones, lets the requests in flight finish
(at most ``SHUTDOWN_GRACE_S``), then the batcher and the thread pools stop and the command
returns normally (exit status 0).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys

from raml.errors import UserError
from raml.evaluate.deploy.serve import create_app
from raml.evaluate.deploy.serve_settings import MIN_TOKEN_LENGTH, ServeSettings, is_loopback

SHUTDOWN_GRACE_S = 60  # a request still running this long after SIGTERM is cancelled
MAX_CONNECTIONS = 64  # beyond, uvicorn answers 503 at once (each connection may hold an upload in memory)
TOKEN_ENV = "RAML_SERVE_TOKEN"


def check_listening(host: str, token: str | None) -> None:
    """Refuse to listen beyond the loopback without a bearer token, and a token too short to be one."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise UserError(
            f"the bearer token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH}, e.g. "
            'python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    if token is None and not is_loopback(host):
        raise UserError(
            f"--host {host} listens beyond this machine: every request must then carry a bearer token. "
            f"Set {TOKEN_ENV} (or --token) to a secret of {MIN_TOKEN_LENGTH}+ characters, or listen on 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; ``UserError`` when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise UserError(f"--host {host}: cannot listen there ({err})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use: pass another --port (or 0 for any free one)") from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def run_service(deploy_dir, host: str, port: int, settings: ServeSettings, *, access_log: bool = True, echo=print):
    """Serve ``deploy_dir`` until SIGTERM or Ctrl-C; returns the number of requests answered. Raises
    ``UserError`` when it cannot listen, or when the models fail to load (the service stops then)."""
    import uvicorn

    check_listening(host, settings.token)
    try:
        app = create_app(deploy_dir, settings)
    except ValueError as err:
        raise UserError(str(err)) from None
    failures: list[str] = []
    sock = bind(host, port)
    logging.basicConfig(format="%(levelname)s:     %(message)s", level=logging.INFO, stream=sys.stderr)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            access_log=access_log,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            limit_concurrency=MAX_CONNECTIONS,
            server_header=False,
            log_level="info",
        )
    )
    app.service.on_load_failed = lambda message: (failures.append(message), setattr(server, "should_exit", True))
    stops = []
    # uvicorn handles SIGTERM/SIGINT itself, then raises the signal again for the handler it found
    # in place: this one, so that a requested stop ends the command normally.
    previous = {
        sig: signal.signal(sig, lambda number, frame: stops.append(number)) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    echo(f"raml serve: {url_of(sock)} (loading {deploy_dir}; GET /health says when it is ready)")
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if failures:
        raise UserError(f"{deploy_dir}: the models could not be loaded: {failures[0]}")
    served = app.service.batcher.images if app.service.batcher else 0
    echo(f"raml serve: stopped{f' ({signal.Signals(stops[0]).name})' if stops else ''}; {served} images scored")
    return served
