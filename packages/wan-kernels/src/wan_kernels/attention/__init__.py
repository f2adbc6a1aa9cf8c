"""Swappable attention backends for ``wan_models.attention``.

Automatic order: FlashAttention 3 > FlashAttention 2 > SageAttention > SDPA, each call falling
through to the next backend that supports its tensors. ``math`` (float32 reference) is used only
when chosen by name. Choose with ``wan_kernels.enable(backend=...)`` or ``WAN_ATTENTION``.
"""

from __future__ import annotations

from .checks import Check
from .flash import FLASH2, FLASH3
from .math import MATH, math_attention
from .registry import (
    AUTO,
    ENTRY_POINT_GROUP,
    ENV_VAR,
    AttentionDispatcher,
    AttentionReport,
    Backend,
    BackendRegistry,
    BackendStatus,
    BackendUnavailable,
)
from .sage import SAGE
from .sdpa import SDPA

REGISTRY = BackendRegistry([FLASH3, FLASH2, SAGE, SDPA, MATH])


def register_backend(backend: Backend, replace: bool = False) -> None:
    """Add a backend at runtime (packages can use the entry-point group instead)."""
    REGISTRY.register(backend, replace=replace)


def unregister_backend(name: str) -> Backend:
    """Remove and return a registered backend."""
    return REGISTRY.unregister(name)


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    return REGISTRY.get(name)


def select(choice: str | None = None) -> AttentionDispatcher:
    """A dispatcher for ``choice`` (``None``: ``$WAN_ATTENTION``, else ``auto``), not installed."""
    return REGISTRY.select(choice)


__all__ = [
    "AUTO", "ENTRY_POINT_GROUP", "ENV_VAR", "FLASH2", "FLASH3", "MATH", "REGISTRY", "SAGE", "SDPA",
    "AttentionDispatcher", "AttentionReport", "Backend", "BackendRegistry", "BackendStatus",
    "BackendUnavailable", "Check", "get_backend", "math_attention", "register_backend", "select",
    "unregister_backend",
]
