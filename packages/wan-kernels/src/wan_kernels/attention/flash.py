"""FlashAttention 3 (Hopper, ``flash_attn_interface``) and FlashAttention 2 (``flash_attn``).

Both take the networks' ``[B, L, H, D]`` layout directly, in fp16/bf16 on CUDA with head dims
that are multiples of 8 up to 256. The packages are imported only when a backend is checked or run.
"""

from __future__ import annotations

import torch

from .checks import Check, cuda_check, import_check, tensor_check
from .registry import Backend

INSTALL_FA3 = "build flash-attention's hopper/ package to get flash_attn_interface"
INSTALL_FA2 = "pip install 'wan-kernels[flash]'"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def flash3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 3 forward (some releases return ``(out, lse)``; only ``out`` is kept)."""
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(*(_last_dim_contiguous(t) for t in (q, k, v)))
    return out[0] if isinstance(out, tuple) else out


def flash2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 2 forward."""
    from flash_attn import flash_attn_func

    return flash_attn_func(*(_last_dim_contiguous(t) for t in (q, k, v)))


def _flash3_available() -> Check:
    ok, reason = cuda_check((9, 0), max_major=9)
    return import_check("flash_attn_interface", INSTALL_FA3) if ok else (ok, reason)


def _flash2_available() -> Check:
    ok, reason = cuda_check((8, 0))
    return import_check("flash_attn", INSTALL_FA2) if ok else (ok, reason)


def _flash3_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
    return tensor_check(q, k, v, min_capability=(9, 0))


def _flash2_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
    return tensor_check(q, k, v, min_capability=(8, 0))


FLASH3 = Backend(
    name="flash3",
    fn=flash3_attention,
    priority=400,
    available=_flash3_available,
    check=_flash3_supports,
    description="FlashAttention 3 (flash_attn_interface); sm90, fp16/bf16, head dim %8 <= 256",
)

FLASH2 = Backend(
    name="flash2",
    fn=flash2_attention,
    priority=300,
    available=_flash2_available,
    check=_flash2_supports,
    description="FlashAttention 2 (flash_attn); sm80+, fp16/bf16, head dim %8 <= 256",
)
