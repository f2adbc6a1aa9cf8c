"""CPU fast path for the DiT: in-place GELU in the MLPs and single-pass elementwise ops.

On a CPU the DiT's time is ~80% float32 GEMMs that MKL already runs near the core's peak, so
what is left to win is memory traffic around them. :class:`InplaceGeluMLP` applies the FFN's
GELU in place on the first linear's output, saving one ``[tokens, ffn_dim]`` allocation and pass
per block (bit-identical). :func:`cpu_ops` gives torch one-kernel versions of the
``wan_models.ops`` that the reference writes as several passes (within float32 rounding); under
``torch.compile`` they trace the reference instead, which inductor fuses itself (and whose real
arithmetic it can compile, unlike the complex RoPE).
Neither keeps any extra copy of a weight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wan_models import ops as wan_ops


class InplaceGeluMLP(nn.Sequential):
    """``Linear, GELU, Linear`` whose GELU overwrites the hidden activations when autograd allows.

    Same children, so the same state_dict keys as the ``nn.Sequential`` it replaces.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, gelu, second = self
        hidden = first(x)
        if torch.is_grad_enabled() and hidden.requires_grad:
            return second(gelu(hidden))  # gelu's backward needs its input
        return second(torch.ops.aten.gelu_(hidden, approximate=gelu.approximate))


def _is_gelu_mlp(module: nn.Module) -> bool:
    return (type(module) is nn.Sequential and len(module) == 3 and type(module[0]) is nn.Linear
            and type(module[1]) is nn.GELU and type(module[2]) is nn.Linear)


def inplace_gelu_mlps(model: nn.Module) -> list[str]:
    """Turn every ``Sequential(Linear, GELU, Linear)`` of ``model`` into an :class:`InplaceGeluMLP`, in
    place (no weight is copied); returns the qualified names of the swapped modules."""
    swapped = []
    for name, module in list(model.named_modules()):
        if name and _is_gelu_mlp(module):
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, InplaceGeluMLP(*module))
            swapped.append(name)
    return swapped


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``ops.modulate`` with the shift/scale folded into LayerNorm's affine (one pass) when one shift/scale
    row serves every token (batch 1, per-video timestep); per-token modulation takes the plain path."""
    if shift.shape[:-1].numel() != 1 or scale.shape[:-1].numel() != 1 or torch.compiler.is_compiling():
        return wan_ops.modulate(x, shift, scale, eps)
    return F.layer_norm(x.float(), x.shape[-1:], (1 + scale).reshape(-1), shift.reshape(-1), eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``ops.gated_residual`` as one ``addcmul``."""
    if torch.compiler.is_compiling():
        return wan_ops.gated_residual(x, y, gate)
    return torch.addcmul(x, y, gate)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``ops.apply_rope`` as one complex multiply of float32 channel pairs (bit-identical on CPU)."""
    x32 = x.float()
    if torch.compiler.is_compiling() or x32.stride(-1) != 1 or any(s % 2 for s in x32.stride()[:-1]) or x32.storage_offset() % 2:
        return wan_ops.apply_rope(x, cos, sin)
    rotated = torch.view_as_complex(x32.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def cpu_ops() -> dict[str, Callable]:
    """``{op name: one-pass torch version}`` for the ``wan_models.ops`` where it measurably helps."""
    return {"modulate": modulate, "gated_residual": gated_residual, "apply_rope": apply_rope}
