"""3D rotary position embedding of the Wan DiT, exact to the float64 reference yet cheap.

Head dim ``d`` is split into ``d - 4*(d//6)`` frame channels and ``2*(d//6)`` each for height and
width; adjacent channel pairs are rotated (theta 10000). Angles are computed once per grid in
float64 and stored as float32 cos/sin tables shared by every block; ``ops.apply_rope`` rotates.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def axis_channels(head_dim: int) -> tuple[int, int, int]:
    """Rotated channel pairs per axis (frame, height, width) for a head dimension."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _axis_angles(positions: torch.Tensor, pairs: int, theta: float) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(pairs, dtype=torch.float64) * 2 / (2 * pairs))
    return torch.outer(positions.to(torch.float64), inv_freq)


@lru_cache(maxsize=32)
def _tables(head_dim: int, f: int, h: int, w: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    pf, ph, pw = axis_channels(head_dim)
    af = _axis_angles(torch.arange(f), pf, theta)
    ah = _axis_angles(torch.arange(h), ph, theta)
    aw = _axis_angles(torch.arange(w), pw, theta)
    angles = torch.cat([
        af[:, None, None, :].expand(f, h, w, pf),
        ah[None, :, None, :].expand(f, h, w, ph),
        aw[None, None, :, :].expand(f, h, w, pw),
    ], dim=-1).reshape(f * h * w, 1, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def rope_tables(head_dim: int, grid: tuple[int, int, int], device: torch.device | str = "cpu",
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[F*H*W, 1, head_dim/2]`` for a token grid in (f, h, w) order."""
    f, h, w = grid
    cos, sin = _tables(head_dim, f, h, w, theta)
    return cos.to(device), sin.to(device)
