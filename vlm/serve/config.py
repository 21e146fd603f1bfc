"""What `vlm-xray serve` is configured with, and the rule for which addresses it may bind."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

API_KEY_ENV = "VLM_XRAY_API_KEY"
API_KEY_HEADER = "X-API-Key"
DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024  # bytes


class ServeConfigError(ValueError):
    """An unsafe or inconsistent serve configuration (e.g. a public bind without an API key)."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # None: the bundled starter
    label_sets: tuple[str, ...] = ("chestxray14",)  # the first is the default of a request
    adapter: str | None = None
    calibration: str = "auto"
    device: str = "auto"
    api_key: str | None = None
    insecure: bool = False  # allow a non-loopback bind without an API key
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_batch: int = 8  # images per encoder call; 1 = no micro-batching
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 32  # requests waiting for the model; beyond this: 503 + Retry-After
    request_timeout_s: float = 120.0  # a request waiting longer for the model gets a 503
    max_pixels: int | None = None  # None: the loader's default decompression-bomb limit
    decode_workers: int = 2  # uploads decoded at the same time (bounds memory)
    cors_origins: tuple[str, ...] = field(default_factory=tuple)  # empty: CORS off
    max_scorers: int = 8  # option sets (labels x styles x variants) kept ready

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: we cannot know what it resolves to, so treat it as public


def api_key_from(option: str | None) -> str | None:
    """--api-key, else $VLM_XRAY_API_KEY; empty strings count as absent."""
    key = option if option is not None else os.environ.get(API_KEY_ENV)
    return key or None


def check_bind(config: ServeConfig) -> None:
    """A non-loopback address serves anyone who can reach it: it needs an API key or an explicit
    --insecure. ServeConfigError says so."""
    if config.loopback or config.api_key or config.insecure:
        return
    raise ServeConfigError(
        f"--host {config.host} is reachable from other machines; give an API key (--api-key KEY or "
        f"${API_KEY_ENV}; clients send it in the {API_KEY_HEADER} header) or pass --insecure to serve "
        "without one")
