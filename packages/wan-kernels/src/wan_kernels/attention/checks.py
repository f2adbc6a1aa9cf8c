"""Small predicates the backends use to say whether they can run, each with a reason.

Every check returns ``(ok, reason)``: the reason is what :func:`wan_kernels.attention_report`
shows when a backend is passed over, so it names the missing package, GPU or tensor property.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Iterable

import torch

Check = tuple[bool, str]
OK: Check = (True, "")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def import_check(module: str, install: str) -> Check:
    """Whether ``module`` imports; the reason says how to install it, or why the import failed."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.split(".")[0] != err.name.split(".")[0]:
            return False, f"importing {module} failed: {err}"
        return False, f"package {module!r} is not installed ({install})"
    except Exception as err:  # broken CUDA extensions raise ImportError/OSError/RuntimeError
        return False, f"importing {module} failed: {type(err).__name__}: {err}"
    return OK


@lru_cache(maxsize=None)
def device_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (cached: asked on every attention call)."""
    return torch.cuda.get_device_capability(index)


def cuda_check(min_capability: tuple[int, int], max_major: int | None = None) -> Check:
    """Whether a CUDA GPU of at least ``min_capability`` (and at most ``max_major``.x) is present."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    cap = device_capability(torch.cuda.current_device())
    if cap < min_capability or (max_major is not None and cap[0] > max_major):
        wanted = f"sm{min_capability[0]}{min_capability[1]}" + ("+" if max_major is None else f"..sm{max_major}x")
        return False, f"needs a {wanted} GPU, this one is sm{cap[0]}{cap[1]}"
    return OK


def layout_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
    """``[B, L, H, D]`` tensors that agree on batch, heads, head dim, dtype and device (k, v on length)."""
    if not (q.ndim == k.ndim == v.ndim == 4):
        return False, f"needs [B, L, H, D] tensors, got {q.ndim}/{k.ndim}/{v.ndim}-d"
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or k.shape != v.shape:
        return False, f"mismatched shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return False, f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if not (q.device == k.device == v.device):
        return False, "q, k, v on different devices"
    return OK


def tensor_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cuda: bool = True,
                 min_capability: tuple[int, int] = (0, 0), dtypes: Iterable[torch.dtype] = HALF_DTYPES,
                 head_dims: Iterable[int] | None = None, max_head_dim: int = 256,
                 head_dim_multiple: int = 8) -> Check:
    """Layout plus the device, capability, dtype and head-dim limits of a GPU kernel."""
    ok, reason = layout_check(q, k, v)
    if not ok:
        return ok, reason
    if cuda and q.device.type != "cuda":
        return False, f"tensors on {q.device.type}, needs cuda"
    if cuda and device_capability(q.device.index or 0) < min_capability:
        major, minor = device_capability(q.device.index or 0)
        return False, f"{q.device} is sm{major}{minor}, needs sm{min_capability[0]}{min_capability[1]}+"
    dtypes = tuple(dtypes)
    if q.dtype not in dtypes:
        return False, f"dtype {q.dtype} not in {', '.join(str(d) for d in dtypes)}"
    d = q.shape[-1]
    if head_dims is not None:
        head_dims = tuple(head_dims)
        if d not in head_dims:
            return False, f"head dim {d} not in {head_dims}"
    elif d > max_head_dim or d % head_dim_multiple:
        return False, f"head dim {d} must be a multiple of {head_dim_multiple} up to {max_head_dim}"
    return OK
