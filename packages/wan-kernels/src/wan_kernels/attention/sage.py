"""SageAttention (``sageattention.sageattn``): 8-bit quantised QK^T, so slightly less exact.

Called with ``tensor_layout="NHD"``, which is the networks' ``[B, L, H, D]``; fp16/bf16 on
sm80+ GPUs with head dim 64, 96 or 128. Imported only when checked or run.
"""

from __future__ import annotations

import torch

from .checks import Check, cuda_check, import_check, tensor_check
from .registry import Backend

HEAD_DIMS = (64, 96, 128)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention forward on ``[B, L, H, D]``."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage_available() -> Check:
    ok, reason = cuda_check((8, 0))
    return import_check("sageattention", "pip install 'wan-kernels[sage]'") if ok else (ok, reason)


def _sage_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
    return tensor_check(q, k, v, min_capability=(8, 0), head_dims=HEAD_DIMS)


SAGE = Backend(
    name="sage",
    fn=sage_attention,
    priority=200,
    available=_sage_available,
    check=_sage_supports,
    description="SageAttention (sageattn, NHD); sm80+, fp16/bf16, head dim 64/96/128, int8 QK",
)
