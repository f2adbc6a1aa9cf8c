"""Merging a parsed LoRA into a network's weights in place, and subtracting it again.

A low-rank pair changes ``W += alpha * (file_alpha / rank) * up @ down``, where ``file_alpha`` is
the file's own ``.alpha`` for that layer (the factor is 1 without one) and ``alpha`` the caller's
strength; a delta changes ``P += alpha * diff``. The sum is formed in float32 one layer at a time
and cast back to the parameter's dtype. Weights stored as fp8 are dequantised and requantised:
layers with ``weight_fp8`` and ``scale`` buffers (``wan_kernels.fp8.FP8Linear``, matched by duck
typing) get a fresh scale of the same layout, plain float8 parameters are cast back (saturating).

:func:`merge_lora` returns a :class:`LoraMerge` holding the file's factors (not full deltas), from
which :func:`unmerge_lora` subtracts exactly what was added; LoRAs stack and unmerge in any order.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..finite import NonFiniteError, check_finite
from ..request import finite_number
from .parse import LoraSource, is_fp8_layer, LayerNames, parse_lora

logger = logging.getLogger(__name__)

_FP8_SCALE_FLOOR = 1e-12  # an all-zero row still gets a finite scale


@dataclass(frozen=True)
class LoraUpdate:
    """What one merge added to one parameter: ``scale * up @ down`` or ``scale * diff``."""

    parameter: str  # e.g. "blocks.0.self_attn.q.weight" (an fp8 layer's dequantised weight included)
    scale: float
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    diff: torch.Tensor | None = None

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The float32 change to the parameter, built on ``device``."""
        if self.diff is not None:
            return self.diff.to(device=device, dtype=torch.float32) * self.scale
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.scale


@dataclass
class LoraMerge:
    """The record of one :func:`merge_lora`: every update it made, so :func:`unmerge_lora` can undo it."""

    source: str
    alpha: float
    updates: tuple[LoraUpdate, ...]
    unmatched: tuple[str, ...]
    module_ref: weakref.ref = field(repr=False)
    merged: bool = True

    @property
    def module(self) -> nn.Module:
        """The network the LoRA was merged into."""
        module = self.module_ref()
        if module is None:
            raise ValueError(f"the network that LoRA {self.source} was merged into no longer exists")
        return module


@torch.no_grad()
def _add(module: nn.Module, update: LoraUpdate, sign: float) -> None:
    """Add ``sign * update`` to its parameter in float32 and store it back in the parameter's dtype."""
    layer_name, _, attr = update.parameter.rpartition(".")
    layer = module.get_submodule(layer_name)
    if attr == "weight" and is_fp8_layer(layer):
        _add_fp8(layer, update, sign)
        return
    param = getattr(layer, attr)
    total = param.float() + sign * update.delta(param.shape, param.device)
    _check_sum(total, update, param.dtype)
    if param.dtype.is_floating_point and param.dtype.itemsize == 1:  # float8: casting would overflow to NaN
        fp8_max = torch.finfo(param.dtype).max
        total = total.clamp(-fp8_max, fp8_max)
    param.copy_(total)


def _check_sum(total: torch.Tensor, update: LoraUpdate, dtype: torch.dtype) -> None:
    """The float32 sum must be finite, and a float16 parameter must be able to hold it (else it stores inf)."""
    what, hint = f"{update.parameter} with the LoRA added (scale {update.scale:g})", "the LoRA or its strength " \
        "is far too large for this network"
    check_finite(total, what, hint)
    if dtype == torch.float16 and float(total.abs().amax()) > torch.finfo(dtype).max:
        raise NonFiniteError(f"{what} exceeds the float16 range (would be stored as inf); {hint}")


def _add_fp8(layer: nn.Module, update: LoraUpdate, sign: float) -> None:
    """Dequantise ``weight_fp8 * scale``, add, and requantise with a new scale of the same layout
    (one per output row, or one for the tensor): the largest magnitude maps to the fp8 maximum."""
    weight_fp8, scale = layer.weight_fp8, layer.scale
    weight = weight_fp8.float() * scale + sign * update.delta(weight_fp8.shape, weight_fp8.device)
    if scale.numel() == 1:
        amax = weight.abs().amax()
    elif scale.numel() == weight.shape[0]:
        amax = weight.abs().amax(dim=1, keepdim=True)
    else:
        raise ValueError(f"{update.parameter}: an fp8 scale of shape {tuple(scale.shape)} is neither per "
                         f"tensor nor per output row of the {tuple(weight.shape)} weight")
    _check_sum(weight, update, torch.float32)
    fp8_max = torch.finfo(weight_fp8.dtype).max
    new_scale = amax.clamp_min(_FP8_SCALE_FLOOR) / fp8_max
    weight_fp8.copy_((weight / new_scale).clamp(-fp8_max, fp8_max))
    scale.copy_(new_scale.reshape(scale.shape))


def merge_lora(module: nn.Module, lora: LoraSource, alpha: float = 1.0, strict: bool = True) -> LoraMerge:
    """Add a LoRA file (safetensors/.pth path, or a state dict) to ``module``'s weights, in place.

    ``alpha`` scales the whole LoRA on top of the file's own ``alpha / rank``. With ``strict``
    (default) a key that names no layer of ``module`` raises ``ValueError`` listing such keys and
    the closest layer names, before anything is changed; ``strict=False`` logs and skips them (they
    are kept in the record's ``unmatched``). Returns the record :func:`unmerge_lora` takes.
    """
    alpha = finite_number("alpha (the LoRA strength)", alpha)
    parsed = parse_lora(lora, module)
    source = parsed.source
    if parsed.unmatched:
        names = LayerNames(module)
        lines = [f"{key} ({names.closest(key)})" for key in parsed.unmatched[:20]]
        more = f"\n  ... and {len(parsed.unmatched) - 20} more" if len(parsed.unmatched) > 20 else ""
        message = (f"{source}: {len(parsed.unmatched)} keys match nothing in the {type(module).__name__}:\n  "
                   + "\n  ".join(lines) + more)
        if strict:
            raise ValueError(message)
        logger.warning("%s; skipping them", message)
    updates = [LoraUpdate(f"{name}.weight" if name else "weight", alpha * lr.scale, down=lr.down, up=lr.up)
               for name, lr in parsed.low_rank.items()]
    updates += [LoraUpdate(name, alpha, diff=diff) for name, diff in parsed.diffs.items()]
    for done, update in enumerate(updates):
        try:
            _add(module, update, 1.0)
        except NonFiniteError:
            for applied in reversed(updates[:done]):  # leave the network as it was
                _add(module, applied, -1.0)
            raise
    logger.info("merged LoRA %s into %s with alpha=%g: %d low-rank layers, %d full deltas", source,
                type(module).__name__, alpha, len(parsed.low_rank), len(parsed.diffs))
    return LoraMerge(source, alpha, tuple(updates), tuple(parsed.unmatched), weakref.ref(module))


def unmerge_lora(module: nn.Module, merge: LoraMerge) -> None:
    """Subtract what ``merge`` added to ``module``; other LoRAs merged before or after stay.

    Float32 weights come back to within rounding (about 1e-7); bf16 and fp8 weights to within
    their own rounding, since each merge and unmerge rounds the sum to the stored dtype.
    """
    if merge.module_ref() is not module:
        raise ValueError(f"LoRA {merge.source} was merged into another network than this "
                         f"{type(module).__name__}")
    if not merge.merged:
        raise ValueError(f"LoRA {merge.source} is not merged (already unmerged)")
    for update in reversed(merge.updates):
        _add(module, update, -1.0)
    merge.merged = False
    logger.info("unmerged LoRA %s from %s", merge.source, type(module).__name__)
