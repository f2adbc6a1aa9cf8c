"""LoRA at inference: merge a LoRA file into a network's weights, and subtract it again.

Every key of a file is read on its own, so one file may mix these namings:

==================  ======================================================================
ours / peft         ``blocks.0.self_attn.q.lora_A.weight`` / ``.lora_B.weight``, optionally
                    under ``base_model.model.`` and with an adapter name (``.lora_A.default.weight``)
DiffSynth           ``blocks.0.self_attn.q.lora_A.default.weight`` / ``.lora_B.default.weight``
kohya / ComfyUI     ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
                    ``.alpha``; also dotted names under ``diffusion_model.``
diffusers           ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (DiT names translated by
                    :data:`wan_models.formats.diffusers.DIT_KEYS`)
full deltas         ``<layer>.diff`` (added to the weight, or to a bare parameter such as
                    ``blocks.0.modulation``) and ``<layer>.diff_b`` (added to the bias)
==================  ======================================================================

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

import difflib
import logging
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from wan_models import WanDiT, read_state_dict
from wan_models.formats.diffusers import DIT_KEYS

from .finite import NonFiniteError, check_finite
from .request import finite_number

logger = logging.getLogger(__name__)

LoraSource = str | os.PathLike | Mapping[str, torch.Tensor]

# Prefixes trainers and converters put before the layer name; stripped one after another.
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")

_LOW_RANK = re.compile(r"(?P<target>.+)\.lora_(?P<part>A|B|down|up)(?:\.(?P<adapter>[^.]+))?\.weight")
_ALPHA = re.compile(r"(?P<target>.+)\.alpha")
_DIFF = re.compile(r"(?P<target>.+)\.(?P<part>diff|diff_b)")
_PART = {"A": "down", "down": "down", "B": "up", "up": "up"}
_FP8_SCALE_FLOOR = 1e-12  # an all-zero row still gets a finite scale


@dataclass(frozen=True)
class LowRank:
    """One layer's factors as in the file: ``down [r, in, ...]``, ``up [out, r, 1...]``, and the file's
    own scale ``alpha / r`` (1 when the file gives no alpha)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass
class ParsedLora:
    """A LoRA file in the module's own names: low-rank factors per layer (module name), full deltas
    per parameter name, and the file keys that name nothing in the module."""

    source: str  # the file's path, or "<state dict>"
    low_rank: dict[str, LowRank] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


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


# ---- reading -------------------------------------------------------------------------------------


class _Names:
    """Finds the module's parameter that a file's layer name means, whatever the naming."""

    def __init__(self, module: nn.Module) -> None:
        self.shapes: dict[str, torch.Size] = {name: p.shape for name, p in module.named_parameters()}
        for name, layer in module.named_modules():
            if _is_fp8_layer(layer):
                self.shapes[f"{name}.weight" if name else "weight"] = layer.weight_fp8.shape
        self.flat = {name.replace(".", "_"): name for name in self.shapes}
        self.diffusers = isinstance(module, WanDiT)

    def find(self, layer: str, attr: str) -> str | None:
        """The parameter ``attr`` (``""``: the name is a parameter itself) of ``layer``, or ``None``."""
        for name in _unprefixed(layer):
            key = f"{name}.{attr}" if attr else name
            if key in self.shapes:
                return key
            if key.replace(".", "_") in self.flat:
                return self.flat[key.replace(".", "_")]
            renamed = DIT_KEYS.rename(key, to_left=True) if self.diffusers else None
            if renamed in self.shapes:
                return renamed
        return None

    def closest(self, key: str) -> str:
        """For an unmatched file key: up to three names of the module resembling what it names."""
        if m := _DIFF.fullmatch(key):  # a parameter
            suffix = ".bias" if m["part"] == "diff_b" else ""
            pool = [name.removesuffix(suffix) for name in self.shapes if name.endswith(suffix)]
        elif m := _LOW_RANK.fullmatch(key) or _ALPHA.fullmatch(key):  # a layer
            pool = [name.removesuffix(".weight") for name in self.shapes if name.endswith(".weight")]
        else:
            return "not a LoRA tensor"
        by_dots = {name.replace("_", "."): name for name in pool}
        query = list(_unprefixed(m["target"]))[-1].replace("_", ".")
        found = difflib.get_close_matches(query, list(by_dots), n=3, cutoff=0.5)
        return f"closest: {', '.join(by_dots[f] for f in found)}" if found else "no similar name"


def _unprefixed(name: str) -> Iterator[str]:
    """``name``, then ``name`` with each known leading prefix removed in turn."""
    yield name
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
                yield name
                break


def _read(lora: LoraSource) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(lora, Mapping):
        state, source = dict(lora), "<state dict>"
    else:
        state, source = read_state_dict(lora), os.fspath(lora)
    for key, tensor in state.items():  # each tensor read once here, before anything is merged
        check_finite(tensor, f"{source}: LoRA tensor {key!r}", "the file is damaged or was trained into NaN")
    return state, source


def parse_lora(lora: LoraSource, module: nn.Module) -> ParsedLora:
    """Read a LoRA file (or state dict) in any supported naming and name its parts as in ``module``.

    Raises ``ValueError`` naming the key for a factor without its partner, a duplicated layer, or
    factors whose product does not fit the layer; keys that name no layer of ``module`` (or are no
    LoRA tensor at all) are listed in ``unmatched``.
    """
    state, source = _read(lora)
    names = _Names(module)
    parsed = ParsedLora(source)
    pairs: dict[str, dict[str, str]] = {}  # layer name in the file -> {"down"/"up"/"alpha": key}
    for key in state:
        if m := _LOW_RANK.fullmatch(key):
            slot = pairs.setdefault(m["target"], {})
            part = _PART[m["part"]]
            if part in slot:
                raise ValueError(f"{source}: two {part} factors for {m['target']!r}: {slot[part]!r} and {key!r}")
            slot[part] = key
        elif m := _ALPHA.fullmatch(key):
            pairs.setdefault(m["target"], {})["alpha"] = key
        elif m := _DIFF.fullmatch(key):
            target = (names.find(m["target"], "weight") or names.find(m["target"], "")) if m["part"] == "diff" \
                else names.find(m["target"], "bias")
            if target is None:
                parsed.unmatched.append(key)
                continue
            _check_diff(source, key, state[key], names.shapes[target])
            if target in parsed.diffs:
                raise ValueError(f"{source}: two deltas for parameter {target!r} (one is {key!r})")
            parsed.diffs[target] = state[key]
        else:
            parsed.unmatched.append(key)
    for layer, slot in pairs.items():
        missing = [f"lora_{label}" for part, label in (("down", "A/down"), ("up", "B/up")) if part not in slot]
        if missing:
            present = ", ".join(repr(slot[p]) for p in sorted(slot))
            raise ValueError(f"{source}: layer {layer!r} has {present} but no {' or '.join(missing)} factor")
        target = names.find(layer, "weight")
        if target is None:
            parsed.unmatched.extend(slot[p] for p in sorted(slot))
            continue
        down, up = state[slot["down"]], state[slot["up"]]
        _check_low_rank(source, slot["up"], down, up, names.shapes[target])
        name = target.removesuffix("weight").removesuffix(".")
        if name in parsed.low_rank:
            raise ValueError(f"{source}: two low-rank pairs for layer {name!r} (one is {slot['up']!r})")
        rank = down.shape[0]
        scale = float(state[slot["alpha"]]) / rank if "alpha" in slot else 1.0
        parsed.low_rank[name] = LowRank(down=down, up=up, scale=scale)
    return parsed


def _check_low_rank(source: str, key: str, down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> None:
    """``up @ down`` must have the layer's ``[out, in * kernel]`` size (linear and conv weights)."""
    fits = (down.ndim >= 2 and up.ndim >= 2 and up.shape[1] == down.shape[0]
            and all(s == 1 for s in up.shape[2:]) and len(shape) >= 2
            and up.shape[0] == shape[0] and down[0].numel() == shape[1:].numel())
    if not fits:
        raise ValueError(f"{source}: {key!r}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit "
                         f"the layer's weight {tuple(shape)}")


def _check_diff(source: str, key: str, diff: torch.Tensor, shape: torch.Size) -> None:
    if diff.shape != shape:
        raise ValueError(f"{source}: {key!r} has shape {tuple(diff.shape)}, the parameter {tuple(shape)}")


# ---- merging -------------------------------------------------------------------------------------


def _is_fp8_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` stores its weight as ``weight_fp8 * scale`` buffers (e.g. ``FP8Linear``)."""
    return isinstance(getattr(layer, "weight_fp8", None), torch.Tensor) and \
        isinstance(getattr(layer, "scale", None), torch.Tensor)


@torch.no_grad()
def _add(module: nn.Module, update: LoraUpdate, sign: float) -> None:
    """Add ``sign * update`` to its parameter in float32 and store it back in the parameter's dtype."""
    layer_name, _, attr = update.parameter.rpartition(".")
    layer = module.get_submodule(layer_name)
    if attr == "weight" and _is_fp8_layer(layer):
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
        names = _Names(module)
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
