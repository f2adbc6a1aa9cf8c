"""Elementwise pieces of the DiT that kernel packages may replace with fused versions.

The torch versions here are the reference. ``wan_kernels`` (or a researcher's package) swaps one in
for one model with ``WanDiT.set_ops`` (its modules pass their own ``op_overrides`` to
:func:`get_op`) or, as the default for every module given none, for the whole process with
:func:`set_op`, which returns the previous function so it can be put back. Every op must match its
reference within float32 rounding.

Facts for memory managers (layer-wise offloading, e.g. :mod:`wan_runtime.memory`), declared as
class attributes of the networks' modules so that a new network needs no manager edit:

- ``children_read_directly: tuple[str, ...]``: (dotted) child modules whose parameters this
  module's forward reads without calling the child (``layer_norm32(x, self.norm3)``,
  ``conv.convolve(...)``): hooks on the child never fire, so their weights move with this module's.
- ``dtype_parameters: tuple[str, ...]``: (dotted) parameters whose dtype this module takes as its
  compute dtype outside their layer's call (``x.to(self.patch_embedding.weight.dtype)``): they must
  hold the compute dtype whenever the module runs, even when the others are stored in float8.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim computed in float32, cast back to ``x``'s dtype, then scaled."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [B, L, H, D]`` by tables ``[L, 1, D/2]`` (float32 math)."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in float32 (no affine); ``shift/scale [B, 1, C]``, or
    ``[B, L, C]`` with per-token timesteps."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with the float32 residual ``x``; ``gate [B, 1, C]`` (or ``[B, L, C]``)."""
    return x + y * gate


DEFAULTS: dict[str, Callable] = {
    "rms_norm": rms_norm, "apply_rope": apply_rope, "modulate": modulate, "gated_residual": gated_residual,
}
_active: dict[str, Callable] = dict(DEFAULTS)


def get_op(name: str, overrides: Mapping[str, Callable] | None = None) -> Callable:
    """The implementation of op ``name``: a module's own from ``overrides`` (``WanDiT.set_ops``), else
    the process-wide one that every module given none calls."""
    if overrides is not None and name in overrides:
        return overrides[name]
    return _active[name]


def check_overrides(overrides: Mapping[str, Callable]) -> None:
    """Raise ``KeyError`` for a name in ``overrides`` that is no replaceable op (a typo would be ignored)."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"unknown op {', '.join(map(repr, unknown))}; replaceable ops: {', '.join(DEFAULTS)}")


def set_op(name: str, fn: Callable | None) -> Callable:
    """Install ``fn`` process-wide for op ``name`` (``None`` restores the torch reference); returns the
    previous one. Modules given their own op (``WanDiT.set_ops``) keep it."""
    check_overrides({name: fn})
    previous, _active[name] = _active[name], fn or DEFAULTS[name]
    return previous
