"""Fused time modulation: ``LayerNorm(x) * (1 + scale) + shift`` (no affine, float32) in one pass
over ``x`` (any float dtype); float32 shift/scale broadcast over tokens (``[B, 1, C]`` strided views of the modulation table,
as the DiT passes them). Matches ``wan_models.ops.modulate`` within float32 rounding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from wan_models.ops import modulate as torch_modulate

from .launch import num_warps, use_kernel


@triton.jit
def _modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, seq_len, n_cols, eps,
                     sx_b, sx_l, sx_c, sh_b, sh_l, sh_c, sc_b, sc_l, sc_c,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b, pos = row // seq_len, row % seq_len
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + b * sx_b + pos * sx_l + cols * sx_c, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    shift = tl.load(shift_ptr + b * sh_b + pos * sh_l + cols * sh_c, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * sc_b + pos * sc_l + cols * sc_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, centred * rstd * (1.0 + scale) + shift, mask=mask)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in float32 (no affine); ``shift/scale [B, 1, C]``."""
    if (x.ndim != 3 or x.numel() == 0 or shift.ndim > 3 or scale.ndim > 3
            or shift.dtype != torch.float32 or scale.dtype != torch.float32
            or not use_kernel(_modulate_kernel, x, shift, scale)):
        return torch_modulate(x, shift, scale, eps)
    try:
        shift, scale = shift.expand(x.shape), scale.expand(x.shape)
    except RuntimeError:  # broadcasts beyond x's shape: the reference handles (or rejects) it
        return torch_modulate(x, shift, scale, eps)
    batch, seq_len, n_cols = x.shape
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    _modulate_kernel[(batch * seq_len,)](x, shift, scale, out, seq_len, n_cols, eps,
                                         *x.stride(), *shift.stride(), *scale.stride(),
                                         BLOCK=block, num_warps=num_warps(block))
    return out
