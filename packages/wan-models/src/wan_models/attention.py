"""The single attention call every network makes, and the hooks to replace it.

Networks call :func:`attention` with ``[B, L, H, D]`` tensors. Other packages (``wan_kernels``)
install a faster implementation for one model (``WanDiT.set_attention_backend``: its attention
modules pass their own ``attention_fn``) or, as the default for every module given none, for the
whole process with :func:`set_attention_backend`; ``wan_models`` itself never imports them.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention through torch SDPA; ``[B, L, H, D]`` in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_backend: AttentionFn = sdpa_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn: AttentionFn | None = None) -> torch.Tensor:
    """Attention over ``[B, L, H, D]`` tensors with ``fn`` (a module's own backend) or, when it is
    ``None``, the process-wide backend (default torch SDPA).

    Under ``torch.compile`` SDPA is traced into the graph; any other backend runs outside it (a
    graph break), as backends may keep Python state (wan_kernels counts calls: traced, every call
    would recompile) or launch kernels dynamo cannot trace.
    """
    fn = _backend if fn is None else fn
    if fn is sdpa_attention:
        return sdpa_attention(q, k, v)
    if torch.compiler.is_compiling():
        return _outside_graph()(fn, q, k, v)
    return fn(q, k, v)


@functools.cache
def _outside_graph() -> Callable[[AttentionFn, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A backend call behind ``torch.compiler.disable``, made on first use: decorating at import
    would import torch._dynamo (and with it triton) whenever wan_models is imported."""
    return torch.compiler.disable(lambda fn, q, k, v: fn(q, k, v))


def set_attention_backend(fn: AttentionFn | None) -> AttentionFn:
    """Install ``fn`` as the process-wide attention: every module not given its own backend
    (``WanDiT.set_attention_backend``) uses it. ``None`` restores SDPA.

    Returns the backend that was active before, so callers can put it back.
    """
    global _backend
    if fn is not None and not callable(fn):
        raise TypeError(f"attention backend must be callable taking (q, k, v), got {fn!r}")
    previous, _backend = _backend, (fn or sdpa_attention)
    return previous


def get_attention_backend() -> AttentionFn:
    """The process-wide attention function: what modules without a backend of their own call."""
    return _backend
