"""The plain reference: ``softmax(Q K^T / sqrt(d)) V`` in float32, for checking the others.

It materialises the ``[B, H, Lq, Lk]`` score matrix, so it is only chosen by name.
"""

from __future__ import annotations

import torch

from .checks import layout_check
from .registry import Backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on ``[B, L, H, D]`` computed in float32; output in ``q``'s dtype."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return (scores.softmax(dim=-1) @ vf).transpose(1, 2).to(q.dtype)


MATH = Backend(
    name="math",
    fn=math_attention,
    priority=None,
    check=layout_check,
    description="float32 softmax(QK^T/sqrt(d))V reference; O(L^2) memory, only when chosen by name",
)
