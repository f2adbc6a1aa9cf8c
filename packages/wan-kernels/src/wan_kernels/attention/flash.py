"""FlashAttention 3 (Hopper, ``flash_attn_interface``) and FlashAttention 2 (``flash_attn``).

Both take the networks' ``[B, L, H, D]`` layout directly, in fp16/bf16 on CUDA with head dims
that are multiples of 8 up to 256. The packages are imported only when a backend is checked or run.
"""

from __future__ import annotations

import torch

from .registry import gpu_backend

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


FLASH3 = gpu_backend(
    "flash3", flash3_attention, 400, module="flash_attn_interface", install=INSTALL_FA3,
    min_capability=(9, 0), max_major=9,
    description="FlashAttention 3 (flash_attn_interface); sm90, fp16/bf16, head dim %8 <= 256",
)

FLASH2 = gpu_backend(
    "flash2", flash2_attention, 300, module="flash_attn", install=INSTALL_FA2, min_capability=(8, 0),
    description="FlashAttention 2 (flash_attn); sm80+, fp16/bf16, head dim %8 <= 256",
)
