"""Optional speed-ups from ``wan_kernels`` (attention backends, fused ops, FP8 linears, CPU fast path).

``wan_runtime`` works without that package; with it, the pipeline installs the best attention
backend and the fused ops the machine supports.
"""

from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'wan-runtime[kernels]'"


def enable_kernels(backend: str | None = None, modules: nn.Module | Iterable[nn.Module | None] | None = None) -> str:
    """Install ``wan_kernels`` (``backend`` None: ``$WAN_ATTENTION`` or the best available); returns the
    active attention backend. Without the package only the built-in torch SDPA is available.

    ``modules`` (DiTs; ``None`` entries, e.g. an absent second expert, are skipped) get the backend
    and fused ops as their own instead of the whole process (``modules=None``).
    """
    try:
        import wan_kernels
    except ImportError:
        if backend not in (None, "auto", "sdpa"):
            raise ValueError(f"attention backend {backend!r} needs the wan-kernels package ({INSTALL_HINT})") from None
        logger.info("wan-kernels is not installed: attention through torch SDPA, no fused ops")
        return "sdpa"
    if modules is not None:
        modules = [modules] if isinstance(modules, nn.Module) else [m for m in modules if m is not None]
    return wan_kernels.enable(backend, modules=modules)


def quantize_fp8(module: nn.Module, include: str | list[str] | None = "blocks.*", scaled_mm: bool = False):
    """Store ``module``'s matching linear layers in FP8 (e4m3, per-channel scales); returns the report."""
    try:
        import wan_kernels
    except ImportError:
        raise ValueError(f"FP8 linear layers need the wan-kernels package ({INSTALL_HINT})") from None
    patterns = [include] if isinstance(include, str) else include
    report = wan_kernels.quantize_fp8(module, include=patterns, scaled_mm=scaled_mm)
    logger.info("FP8: %s", report)
    return report


def optimize_for_cpu(module: nn.Module):
    """The ``wan_kernels`` CPU fast path for ``module`` (in-place MLP GELU, one-pass elementwise ops);
    returns its report, or ``None`` (a log line) without the package: the model runs unchanged."""
    try:
        import wan_kernels
    except ImportError:
        logger.info("wan-kernels is not installed: no CPU fast path (%s)", INSTALL_HINT)
        return None
    return wan_kernels.optimize_for_cpu(module)
