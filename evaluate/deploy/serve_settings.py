"""``serve``'s settings (limits, batching, token) and the loopback test, apart from the web stack so
that the command line reads their defaults without importing it (it is an optional extra)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

LOOPBACK_NAMES = {"localhost"}
MIN_TOKEN_LENGTH = 16  # a shorter bearer token can be guessed
HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class ServeSettings:
    """The service's limits and batching; each default with its reason."""

    token: str | None = None  # bearer token every /v1/ request must carry (None: loopback only)
    max_upload_bytes: int = 32 * 2**20  # a 20 MP 8-bit PNG of a textured part is ~30 MB
    max_pixels: int = 40_000_000  # 8000 x 5000; decoding it needs ~120 MB
    max_images: int = 16  # per request
    max_batch: int = 8  # images per encoder call
    batch_wait_ms: float = 5.0  # how long the first image waits for others to share its call
    decode_threads: int = 2  # images decoded and cropped at once
    loopback_only: bool = True  # the listening address is a loopback one (Host headers are checked)

    @property
    def max_pending(self) -> int:
        """Decoded images waiting for the model at most (serve_model.py): two batches' worth."""
        return max(2 * self.max_batch, self.decode_threads)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine alone: 127.0.0.0/8, ::1 or localhost."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def is_listen_address(text: str) -> bool:
    """An IP address or a host name (RFC 1123 labels) that ``--host`` may name."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(HOST_NAME.fullmatch(text))
