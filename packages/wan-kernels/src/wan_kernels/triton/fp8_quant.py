"""Fused per-row FP8 quantisation of activations for ``torch._scaled_mm``: one read of ``x``,
one write of the float8_e4m3fn rows and their float32 scales (``x ~= x_fp8 * scale``), instead
of the several full-size float32 passes eager torch needs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import num_warps

FP8_MAX = 448.0
TINY = 1e-12  # floor for an all-zero row's amax


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, x_row_stride, n_cols, fp8_max, tiny, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), tiny) / fp8_max
    q = tl.clamp(x / scale, -fp8_max, fp8_max)
    tl.store(out_ptr + row * n_cols + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows_fp8 [M, K], scale [M, 1] float32)`` for a 2-d tensor whose rows are contiguous."""
    if rows.ndim != 2 or rows.stride(1) != 1:
        rows = rows.reshape(-1, rows.shape[-1]).contiguous()
    n_rows, n_cols = rows.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.float8_e4m3fn, device=rows.device)
    scale = torch.empty(n_rows, 1, dtype=torch.float32, device=rows.device)
    block = triton.next_power_of_2(n_cols)
    _quantize_rows_kernel[(n_rows,)](rows, out, scale, rows.stride(0), n_cols, FP8_MAX, TINY,
                                     BLOCK=block, num_warps=num_warps(block))
    return out, scale
