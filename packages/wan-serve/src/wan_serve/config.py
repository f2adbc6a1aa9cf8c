"""``ServeConfig``: every setting of ``wan serve`` / ``wan worker`` in one dataclass, checked once.

The defaults serve the embedded tiny model on loopback with an SQLite store under ``./wan-serve``:
nothing else has to run beside it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
TOKEN_ENV = "WAN_API_TOKEN"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve to anything


@dataclass
class ServeConfig:
    """Settings of the server and its workers (see ``wan serve --help`` for each one's meaning).

    ``token`` falls back to ``$WAN_API_TOKEN``; ``db_url`` to an SQLite file in ``state_dir``;
    ``lora_dir`` to ``state_dir/loras``; ``dtype`` None is bfloat16 on CUDA and float32 elsewhere.
    """

    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    state_dir: str = "./wan-serve"
    db_url: str | None = None
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    max_pixels: int = 1280 * 720
    max_frames: int = 161
    max_steps: int = 100
    max_upload_bytes: int = 10 * MIB
    retention_seconds: int = 24 * 3600
    lease_seconds: float = 60.0
    device: str | None = None
    dtype: str | None = None
    workers: int = 1
    lora_dir: str | None = None
    models_dir: str = "models"
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.token is None:
            self.token = os.environ.get(TOKEN_ENV) or None
        self.models = list(self.models)
        self.cors_origins = tuple(self.cors_origins)
        for name in ("port", "max_pixels", "max_frames", "max_steps", "max_upload_bytes", "retention_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0 (0: API only), got {self.workers!r}")
        for name in ("lease_seconds", "poll_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty or blank")

    def resolved_db_url(self) -> str:
        """The store's SQLAlchemy URL: ``db_url``, or ``sqlite:///<state_dir>/jobs.db``."""
        if self.db_url:
            return self.db_url
        return f"sqlite:///{Path(self.state_dir).expanduser().absolute() / 'jobs.db'}"

    def resolved_lora_dir(self) -> Path:
        """The folder whose LoRA files requests may name (``lora_dir`` or ``state_dir/loras``)."""
        return Path(self.lora_dir if self.lora_dir else Path(self.state_dir) / "loras").expanduser()

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without a token, unless ``insecure`` says so on purpose."""
        if not is_loopback(self.host) and self.token is None and not self.insecure:
            raise ValueError(f"refusing to listen on {self.host} without a token: anyone who can reach it could "
                             f"use the GPUs; pass --token (or set ${TOKEN_ENV}), or --insecure if that is intended")
