"""wan-serve: the Wan models behind an OpenAI-shaped asynchronous video API with a durable job queue.

``create_app`` builds the HTTP API over a :class:`JobStore` (SQLite or PostgreSQL); :class:`Worker`
claims and runs its jobs; ``wan_serve.server.serve`` / ``work`` are ``wan serve`` / ``wan worker``.
"""

from .api import create_app
from .config import ServeConfig
from .store import JobStore
from .worker import Worker

__all__ = ["JobStore", "ServeConfig", "Worker", "create_app"]
