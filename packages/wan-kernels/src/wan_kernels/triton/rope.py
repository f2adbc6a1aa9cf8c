"""Fused 3D-RoPE rotation: reads ``x [B, L, H, D]`` once (any strides; power-of-two head dims,
as Wan's 128) and the shared ``[L, 1, D/2]`` float32 cos/sin tables, rotates adjacent channel
pairs in float32 and writes a contiguous result in ``x``'s dtype; matches
``wan_models.ops.apply_rope`` within float32 rounding (the GPU may fuse multiply-adds)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from wan_models.ops import apply_rope as torch_apply_rope

from .launch import num_warps, use_kernel


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, n_heads,
                 sx_b, sx_l, sx_h, sx_d, sc_l, sc_d, ss_l, ss_d,
                 BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * seq_len + l
    b, pos = row // seq_len, row % seq_len
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    chans = tl.arange(0, HEAD_DIM)
    pairs = tl.arange(0, HEAD_DIM // 2)
    mask = (heads[:, None] < n_heads) & (chans[None, :] < HEAD_DIM)
    # Whole head rows, read contiguously, then split into (real, imag) channel pairs.
    x = tl.load(x_ptr + b * sx_b + pos * sx_l + heads[:, None] * sx_h + chans[None, :] * sx_d,
                mask=mask, other=0.0).to(tl.float32)
    real, imag = tl.split(tl.reshape(x, (BLOCK_H, HEAD_DIM // 2, 2)))
    cos = tl.load(cos_ptr + pos * sc_l + pairs * sc_d)[None, :]
    sin = tl.load(sin_ptr + pos * ss_l + pairs * ss_d)[None, :]
    out = tl.reshape(tl.join(real * cos - imag * sin, real * sin + imag * cos), (BLOCK_H, HEAD_DIM))
    dst = out_ptr + row * n_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + chans[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _heads_per_program(n_heads: int, head_dim: int) -> int:
    """Largest power of two dividing ``n_heads`` with at most 4096 elements per program (no idle lanes)."""
    block = 1
    while n_heads % (block * 2) == 0 and block * 2 * head_dim <= 4096:
        block *= 2
    return block


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [B, L, H, D]`` by tables ``[L, 1, D/2]`` (float32 math)."""
    if x.ndim != 4 or x.numel() == 0 or x.shape[-1] < 2 or x.shape[-1] & (x.shape[-1] - 1):
        return torch_apply_rope(x, cos, sin)  # the kernel takes power-of-two head dims (Wan: 128)
    batch, seq_len, n_heads, head_dim = x.shape
    table_shape = (seq_len, 1, head_dim // 2)
    if (cos.ndim != 3 or sin.ndim != 3 or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or cos.shape[1] != 1 or sin.shape[1] != 1 or not use_kernel(_rope_kernel, x, cos, sin)):
        return torch_apply_rope(x, cos, sin)
    try:
        cos, sin = cos.expand(table_shape), sin.expand(table_shape)
    except RuntimeError:  # not broadcastable: let the reference raise its own error
        return torch_apply_rope(x, cos, sin)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = _heads_per_program(n_heads, head_dim)
    grid = (batch * seq_len, triton.cdiv(n_heads, block_h))
    _rope_kernel[grid](x, cos, sin, out, seq_len, n_heads,
                       *x.stride(), cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
                       BLOCK_H=block_h, HEAD_DIM=head_dim, num_warps=num_warps(block_h * head_dim))
    return out
