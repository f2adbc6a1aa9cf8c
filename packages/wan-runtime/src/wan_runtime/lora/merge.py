"""Merging a parsed LoRA into a network's weights in place, and subtracting it again.

A low-rank pair changes ``W += alpha * (file_alpha / rank) * up @ down``, where ``file_alpha / rank``
is the layer's scale as the file keeps it (:mod:`.scale`; 1 without one) and ``alpha`` the caller's
strength; a delta changes ``P += alpha * diff``; a DoRA layer is merged as :mod:`.dora` describes.
The sum is formed in float32 one layer at a time and cast back to the parameter's dtype. Weights
stored as fp8 are dequantised and requantised: layers with ``weight_fp8`` and ``scale`` buffers
(``wan_kernels.fp8.FP8Linear``, matched by duck typing) get a fresh scale of the same layout, plain
float8 parameters are cast back (saturating).

:func:`merge_lora` returns a :class:`LoraMerge` holding the file's factors (not full deltas), from
which :func:`unmerge_lora` subtracts exactly what was added. Plain LoRAs stack and unmerge in any
order; a DoRA merge rescales the weight, so LoRAs sharing a layer with one unmerge in reverse order.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..finite import NonFiniteError, check_finite
from ..request import finite_number
from .dora import DoraUpdate
from .layouts import BASE_KEY
from .names import LayerNames, is_fp8_layer
from .parse import LoraSource, ParsedLora, parse_lora

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

    def apply(self, value: torch.Tensor, sign: float) -> torch.Tensor:
        """``value`` (float32) with the change added (``sign`` 1) or subtracted (-1)."""
        return value + sign * self.delta(value.shape, value.device)


Update = LoraUpdate | DoraUpdate


@dataclass
class LoraMerge:
    """The record of one :func:`merge_lora`: every update it made, so :func:`unmerge_lora` can undo it."""

    source: str
    alpha: float
    updates: tuple[Update, ...]
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
def _add(module: nn.Module, update: Update, sign: float) -> None:
    """Add ``sign * update`` to its parameter in float32 and store it back in the parameter's dtype."""
    layer_name, _, attr = update.parameter.rpartition(".")
    layer = module.get_submodule(layer_name)
    if attr == "weight" and is_fp8_layer(layer):
        _add_fp8(layer, update, sign)
        return
    param = getattr(layer, attr)
    total = update.apply(param.float(), sign)
    _check_sum(total, update, param.dtype)
    if param.dtype.is_floating_point and param.dtype.itemsize == 1:  # float8: casting would overflow to NaN
        fp8_max = torch.finfo(param.dtype).max
        total = total.clamp(-fp8_max, fp8_max)
    param.copy_(total)


def _check_sum(total: torch.Tensor, update: Update, dtype: torch.dtype) -> None:
    """The float32 sum must be finite, and a float16 parameter must be able to hold it (else it stores inf)."""
    what, hint = f"{update.parameter} with the LoRA added (scale {update.scale:g})", "the LoRA or its strength " \
        "is far too large for this network"
    check_finite(total, what, hint)
    if dtype == torch.float16 and float(total.abs().amax()) > torch.finfo(dtype).max:
        raise NonFiniteError(f"{what} exceeds the float16 range (would be stored as inf); {hint}")


def _add_fp8(layer: nn.Module, update: Update, sign: float) -> None:
    """Dequantise ``weight_fp8 * scale``, add, and requantise with a new scale of the same layout
    (one per output row, or one for the tensor): the largest magnitude maps to the fp8 maximum."""
    weight_fp8, scale = layer.weight_fp8, layer.scale
    weight = update.apply(weight_fp8.float() * scale, sign)
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
    """Add a LoRA file (safetensors/.pth path, peft adapter folder, or a state dict) to ``module``'s
    weights, in place.

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
    _note_family(parsed, module)
    updates: list[Update] = []
    for name, lr in parsed.low_rank.items():
        parameter = f"{name}.weight" if name else "weight"
        updates.append(LoraUpdate(parameter, alpha * lr.scale, down=lr.down, up=lr.up) if lr.magnitude is None
                       else DoraUpdate(parameter, lr.scale, alpha, lr.down, lr.up, lr.magnitude, lr.per_input))
    updates += [LoraUpdate(name, alpha, diff=diff) for name, diff in parsed.diffs.items()]
    for done, update in enumerate(updates):
        try:
            _add(module, update, 1.0)
        except (NonFiniteError, ValueError):
            for applied in reversed(updates[:done]):  # leave the network as it was
                _add(module, applied, -1.0)
            raise
    dora = sum(isinstance(update, DoraUpdate) for update in updates)
    logger.info("merged LoRA %s into %s with alpha=%g: %d low-rank layers (%d DoRA), %d full deltas", source,
                type(module).__name__, alpha, len(parsed.low_rank), dora, len(parsed.diffs))
    merge = LoraMerge(source, alpha, tuple(updates), tuple(parsed.unmatched), weakref.ref(module))
    _MERGES.setdefault(module, []).append(merge)
    return merge


# The merges made into each network, oldest first, for the order a DoRA merge imposes.
_MERGES: weakref.WeakKeyDictionary[nn.Module, list[LoraMerge]] = weakref.WeakKeyDictionary()


def _note_family(parsed: ParsedLora, module: nn.Module) -> None:
    """One info line when the file's header (:data:`.layouts.BASE_KEY`) names another family than
    the DiT's (a Wan 2.1 LoRA on a Wan 2.2 expert: allowed, the shapes fit) or the other expert."""
    identity, config = getattr(module, "identity", None), getattr(module, "config", None)
    try:
        base = json.loads(parsed.header.get(BASE_KEY, "{}"))
    except json.JSONDecodeError:
        logger.warning("%s: header %s is not valid JSON; ignoring it", parsed.source, BASE_KEY)
        return
    if not isinstance(base, dict):
        return
    family = getattr(config, "family", None)
    if base.get("family") and family and base["family"] != family:
        logger.info("%s: a %s LoRA (for %s) merged into a %s DiT; the shapes fit, so it is allowed", parsed.source,
                    base["family"], base.get("model") or base.get("variant") or "its base model", family)
    expert = getattr(identity, "expert", None)
    if base.get("expert") and expert and base["expert"] != expert:
        logger.info("%s: a LoRA trained for the %s-noise expert merged into the %s-noise expert", parsed.source,
                    base["expert"], expert)


def unmerge_lora(module: nn.Module, merge: LoraMerge) -> None:
    """Subtract what ``merge`` added to ``module``; other LoRAs merged before or after stay.

    Float32 weights come back to within rounding (about 1e-7); bf16 and fp8 weights to within
    their own rounding, since each merge and unmerge rounds the sum to the stored dtype. A LoRA
    merged later that shares a layer with this one, where either is DoRA, must be unmerged first.
    """
    if merge.module_ref() is not module:
        raise ValueError(f"LoRA {merge.source} was merged into another network than this "
                         f"{type(module).__name__}")
    if not merge.merged:
        raise ValueError(f"LoRA {merge.source} is not merged (already unmerged)")
    merges = _MERGES.get(module, [])
    later = merges[merges.index(merge) + 1:] if merge in merges else []
    for other in later:
        if other.merged and (shared := _order_bound(merge, other)):
            raise ValueError(f"unmerge LoRA {other.source} first: it was merged after {merge.source} and shares "
                             f"{shared} with it, and a DoRA merge does not commute")
    for update in reversed(merge.updates):
        _add(module, update, -1.0)
    merge.merged = False
    if merge in merges:
        merges.remove(merge)
    logger.info("unmerged LoRA %s from %s", merge.source, type(module).__name__)


def _order_bound(first: LoraMerge, second: LoraMerge) -> str | None:
    """A parameter both merges change where either change is DoRA, or ``None``."""
    dora = {u.parameter for m in (first, second) for u in m.updates if isinstance(u, DoraUpdate)}
    shared = {u.parameter for u in first.updates} & {u.parameter for u in second.updates}
    return next(iter(sorted(shared & dora)), None)
