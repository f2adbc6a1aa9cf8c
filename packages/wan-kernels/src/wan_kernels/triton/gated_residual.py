"""Fused gated residual ``x + y * gate``: one pass over the float32 residual ``x`` and the block
output ``y`` (any float dtype), ``gate`` broadcast over tokens (``[B, 1, C]`` views). Fused only
when the result is float32 (the DiT's residual stream); matches ``wan_models.ops.gated_residual``
within float32 rounding (the GPU may fuse the multiply-add)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from wan_models.ops import gated_residual as torch_gated_residual

from .launch import num_warps, use_kernel

BLOCK = 1024


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, seq_len, n_cols,
                           sx_b, sx_l, sx_c, sy_b, sy_l, sy_c, sg_b, sg_l, sg_c,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b, pos = row // seq_len, row % seq_len
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + b * sx_b + pos * sx_l + cols * sx_c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * sy_b + pos * sy_l + cols * sy_c, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * sg_b + pos * sg_l + cols * sg_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, x + y * gate, mask=mask)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with the float32 residual ``x``; ``gate [B, 1, C]``."""
    if (x.ndim != 3 or x.numel() == 0 or y.ndim > 3 or gate.ndim > 3
            or torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype) != torch.float32
            or not use_kernel(_gated_residual_kernel, x, y, gate)):
        return torch_gated_residual(x, y, gate)
    try:
        y, gate = y.expand(x.shape), gate.expand(x.shape)
    except RuntimeError:  # broadcasts beyond x's shape: the reference handles (or rejects) it
        return torch_gated_residual(x, y, gate)
    batch, seq_len, n_cols = x.shape
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    grid = (batch * seq_len, triton.cdiv(n_cols, BLOCK))
    _gated_residual_kernel[grid](x, y, gate, out, seq_len, n_cols,
                                 *x.stride(), *y.stride(), *gate.stride(),
                                 BLOCK=BLOCK, num_warps=num_warps(BLOCK))
    return out
