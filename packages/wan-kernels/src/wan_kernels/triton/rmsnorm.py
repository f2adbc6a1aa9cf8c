"""Fused RMS norm: one read of ``x``, float32 statistics, one write; same result as
``wan_models.ops.rms_norm`` up to float32 summation order (so outputs in bf16/fp16 may differ
by one unit in the last place where the normalised value sits on a rounding boundary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from wan_models.ops import rms_norm as torch_rms_norm

from .launch import num_warps, use_kernel


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, x_col_stride, w_stride, n_cols, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols * x_col_stride, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Round to x's dtype before the weight, as the reference does.
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols * w_stride, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim computed in float32, cast back to ``x``'s dtype, then scaled."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if (weight.ndim != 1 or weight.shape[0] != x.shape[-1] or x.numel() == 0
            or not use_kernel(_rms_norm_kernel, x, weight)):
        return torch_rms_norm(x, weight, eps)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), x2.stride(1), weight.stride(0), n_cols,
                                     eps, BLOCK=block, num_warps=num_warps(block))
    return out
