"""Fast paths for ``wan_models``, installed through its hooks (``wan_models`` never imports this).

``enable()`` installs an attention dispatcher (FlashAttention 3 > 2 > SageAttention > SDPA, or a
backend chosen by name / ``$WAN_ATTENTION``) and, where triton and a GPU are present, the fused
Triton versions of the DiT's elementwise ops; ``disable()`` puts back what was there before.
``quantize_fp8(model)`` stores linear weights in FP8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from wan_models import attention as wan_attention
from wan_models import ops as wan_ops

from .attention import REGISTRY, AttentionDispatcher, AttentionReport, Backend, BackendUnavailable
from .fp8 import FP8Linear, FP8Report, quantize_fp8

logger = logging.getLogger(__name__)


@dataclass
class _Installed:
    """What :func:`enable` replaced, to be restored by :func:`disable`."""

    dispatcher: AttentionDispatcher
    previous_attention: Callable
    ops: dict[str, tuple[Callable, Callable]]  # op name -> (previous, installed)


_installed: _Installed | None = None


def available_backends() -> list[str]:
    """Attention backends that can run on this machine, in automatic-choice order (then name-only ones)."""
    return REGISTRY.available()


def enable(backend: str | None = None, fused_ops: bool = True) -> str:
    """Install the attention ``backend`` (``None``: ``$WAN_ATTENTION``, else ``"auto"``) and, if
    ``fused_ops``, the Triton fused ops the machine can run. Returns the active backend's name.

    Raises :class:`BackendUnavailable` (changing nothing) for a named backend that cannot run here.
    Calling it again first undoes the previous call.
    """
    global _installed
    dispatcher = REGISTRY.select(backend)
    fused = _fused_ops() if fused_ops else {}
    disable()
    previous = wan_attention.set_attention_backend(dispatcher)
    installed_ops = {name: (wan_ops.set_op(name, fn), fn) for name, fn in fused.items()}
    _installed = _Installed(dispatcher, previous, installed_ops)
    logger.info("wan_kernels: attention %s (%s), fused ops: %s", dispatcher.active, dispatcher.choice,
                ", ".join(fused) or "none")
    return dispatcher.active


def disable() -> None:
    """Restore the attention function and ops that were installed before :func:`enable`.

    A hook someone replaced after ``enable`` is left alone (with a warning) rather than clobbered.
    """
    global _installed
    if _installed is None:
        return
    if wan_attention.get_attention_backend() is _installed.dispatcher:
        wan_attention.set_attention_backend(_installed.previous_attention)
    else:
        logger.warning("wan_kernels.disable: attention was replaced after enable(); leaving it")
    for name, (previous, ours) in _installed.ops.items():
        if wan_ops.get_op(name) is ours:
            wan_ops.set_op(name, previous)
        else:
            logger.warning("wan_kernels.disable: op %s was replaced after enable(); leaving it", name)
    _installed = None


def attention_report(backend: str | None = None) -> AttentionReport:
    """Which attention backend is active and why every other one was passed over.

    Describes the installed selection (with per-backend call counts) when :func:`enable` is in
    effect and ``backend`` is ``None``; otherwise what ``enable(backend)`` would choose. ``str()``
    of the report is a readable table.
    """
    if _installed is not None and backend is None:
        installed = wan_attention.get_attention_backend() is _installed.dispatcher
        return REGISTRY.report(dispatcher=_installed.dispatcher, installed=installed)
    return REGISTRY.report(backend)


def _fused_ops() -> dict[str, Callable]:
    """The fused ops this machine can run ({} with a log line saying why when it cannot)."""
    from . import triton as fused

    ok, reason = fused.status()
    if not ok:
        logger.info("wan_kernels: fused ops not installed: %s", reason)
        return {}
    return fused.fused_ops()


__all__ = [
    "AttentionReport", "Backend", "BackendUnavailable", "FP8Linear", "FP8Report", "attention_report",
    "available_backends", "disable", "enable", "quantize_fp8",
]
