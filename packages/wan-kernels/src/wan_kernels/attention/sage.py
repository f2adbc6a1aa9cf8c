"""SageAttention (``sageattention.sageattn``): 8-bit quantised QK^T, so slightly less exact.

Called with ``tensor_layout="NHD"``, which is the networks' ``[B, L, H, D]``; fp16/bf16 on
sm80+ GPUs with head dim 64, 96 or 128. Imported only when checked or run.
"""

from __future__ import annotations

import torch

from .registry import gpu_backend

HEAD_DIMS = (64, 96, 128)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention forward on ``[B, L, H, D]``."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


SAGE = gpu_backend(
    "sage", sage_attention, 200, module="sageattention", install="pip install 'wan-kernels[sage]'",
    min_capability=(8, 0), head_dims=HEAD_DIMS,
    description="SageAttention (sageattn, NHD); sm80+, fp16/bf16, head dim 64/96/128, int8 QK",
)
