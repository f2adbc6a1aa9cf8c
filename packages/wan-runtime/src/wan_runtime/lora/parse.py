"""Reading a LoRA file: every supported naming, mapped onto the layers of a network.

Every key of a file is read on its own, so one file may mix these namings:

==================  ======================================================================
ours / peft         ``blocks.0.self_attn.q.lora_A.weight`` / ``.lora_B.weight``, optionally
                    under ``base_model.model.`` and with an adapter name (``.lora_A.default.weight``);
                    a peft adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``)
DiffSynth           ``blocks.0.self_attn.q.lora_A.default.weight`` / ``.lora_B.default.weight``
kohya / ComfyUI     ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
                    ``.alpha``; also dotted names under ``diffusion_model.`` (LightX2V and
                    Lightning few-step LoRAs: that, plus deltas on norms, biases and modulations)
diffusers           ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (DiT names translated by
                    :data:`wan_models.formats.diffusers.DIT_KEYS`); ``.lora_B.bias`` (peft's
                    ``lora_bias``) changes the layer's bias by ``scale * bias``
full deltas         ``<layer>.diff`` (added to the weight, or to a bare parameter such as
                    ``blocks.0.modulation``), ``<layer>.diff_b`` (added to the bias) and
                    ``<block>.diff_m`` (added to ``<block>.modulation``, LightX2V's name)
DoRA                ``<layer>.lora_magnitude_vector`` (peft) or ``<layer>.dora_scale`` (kohya,
                    LyCORIS) beside the factors: merged as peft merges DoRA (:mod:`.dora`)
==================  ======================================================================

Each layer's scale ``alpha / rank`` comes from wherever the file keeps it (:mod:`.scale`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from wan_models import read_state_dict

from ..finite import check_finite
from .fit import size_hint, vace_problem
from .names import DIFF, PART, SLOTS, LayerNames
from .scale import HeaderScale, layer_scale, locate

logger = logging.getLogger(__name__)

LoraSource = str | os.PathLike | Mapping[str, torch.Tensor]

@dataclass(frozen=True)
class LowRank:
    """One layer's factors as in the file: ``down [r, in, ...]``, ``up [out, r, 1...]``, the file's
    own scale ``alpha / r`` (1 when the file gives no alpha) and, for DoRA, the magnitude (one value
    per output row, or per input channel when ``per_input``)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    per_input: bool = False


@dataclass
class ParsedLora:
    """A LoRA file in the module's own names: low-rank factors per layer (module name), full deltas
    per parameter name, the file keys that name nothing in the module, and the file's header."""

    source: str  # the file's path, or "<state dict>"
    low_rank: dict[str, LowRank] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)


def _read(lora: LoraSource) -> tuple[dict[str, torch.Tensor], str, dict[str, str], HeaderScale | None]:
    """The tensors, the name for messages, the safetensors header and the scale a header declares."""
    if isinstance(lora, Mapping):
        state, source, header, scale = dict(lora), "<state dict>", {}, None
    else:
        found = locate(lora)
        state, source, header, scale = read_state_dict(found.weights), os.fspath(lora), found.header, found.scale
    for key, tensor in state.items():  # each tensor read once here, before anything is merged
        check_finite(tensor, f"{source}: LoRA tensor {key!r}", "the file is damaged or was trained into NaN")
    return state, source, header, scale


def parse_lora(lora: LoraSource, module: nn.Module) -> ParsedLora:
    """Read a LoRA file, peft adapter folder or state dict in any supported naming and name its parts
    as in ``module``, each layer with its scale from wherever the file keeps it (:mod:`.scale`).

    Raises ``ValueError`` (nothing merged yet) naming the keys for: a factor without its partner, a
    duplicated layer, factors of different ranks, a rank the header contradicts, DoRA magnitudes of the
    wrong length, factors or deltas whose shape does not fit the layer or blocks the module lacks (with
    the model size the file fits, :mod:`.fit`), and VACE keys for a DiT without VACE blocks. Keys that
    name no layer of ``module`` (or are no LoRA tensor at all) are listed in ``unmatched``.
    """
    state, source, header, header_scale = _read(lora)
    if problem := vace_problem(state, module):
        raise ValueError(f"{source}: {problem}")
    names = LayerNames(module)
    parsed = ParsedLora(source, header=header)
    pairs: dict[str, dict[str, str]] = {}  # layer name in the file -> {"down"/"up"/"alpha"/"bias"/"dora": key}
    misfits: list[str] = []
    for key in state:
        if found := next(((m, part) for regex, part in SLOTS if (m := regex.fullmatch(key))), None):
            m, part = found
            part = part or PART[m["part"]]
            slot = pairs.setdefault(m["target"], {})
            if part in slot:
                raise ValueError(f"{source}: two {part} tensors for {m['target']!r}: {slot[part]!r} and {key!r}")
            slot[part] = key
        elif m := DIFF.fullmatch(key):
            target = _diff_target(names, m["target"], m["part"])
            if target is None:
                parsed.unmatched.append(key)
            elif state[key].shape != names.shapes[target]:
                misfits.append(f"{key!r} has shape {tuple(state[key].shape)}, the parameter {tuple(names.shapes[target])}")
            elif target in parsed.diffs:
                raise ValueError(f"{source}: two deltas for parameter {target!r} (one is {key!r})")
            else:
                parsed.diffs[target] = state[key]
        else:
            parsed.unmatched.append(key)
    for layer, slot in pairs.items():
        _add_layer(parsed, names, state, layer, slot, header_scale, misfits)
    _check_size(parsed, state, module, misfits)
    return parsed


def _diff_target(names: LayerNames, target: str, part: str) -> str | None:
    """The parameter a ``.diff`` (weight, or a bare parameter), ``.diff_b`` (bias) or ``.diff_m``
    (the ``modulation`` table of a block or the head, LightX2V's naming) changes."""
    if part == "diff_m":
        return names.find(f"{target}.modulation", "")
    if part == "diff_b":
        return names.find(target, "bias")
    return names.find(target, "weight") or names.find(target, "")


def _add_layer(parsed: ParsedLora, names: LayerNames, state: Mapping[str, torch.Tensor], layer: str,
               slot: dict[str, str], header_scale: HeaderScale | None, misfits: list[str]) -> None:
    """Check one file layer's tensors and add them to ``parsed`` (or its keys to ``unmatched``)."""
    source = parsed.source
    missing = [f"lora_{label}" for part, label in (("down", "A/down"), ("up", "B/up")) if part not in slot]
    if missing:
        present = ", ".join(repr(slot[p]) for p in sorted(slot))
        raise ValueError(f"{source}: layer {layer!r} has {present} but no {' or '.join(missing)} factor")
    target = names.find(layer, "weight")
    if target is None:
        parsed.unmatched.extend(slot[p] for p in sorted(slot))
        return
    down, up = state[slot["down"]], state[slot["up"]]
    if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"{source}: layer {layer!r}: {slot['down']!r} {tuple(down.shape)} and {slot['up']!r} "
                         f"{tuple(up.shape)} are not factors of one rank (down [rank, in], up [out, rank])")
    shape = names.shapes[target]
    if not _fits(down, up, shape):
        misfits.append(f"{slot['up']!r}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit the layer's "
                       f"weight {tuple(shape)}")
        return
    name = target.removesuffix("weight").removesuffix(".")
    if name in parsed.low_rank:
        raise ValueError(f"{source}: two low-rank pairs for layer {name!r} (one is {slot['up']!r})")
    tensor_alpha = None
    if "alpha" in slot:
        if state[slot["alpha"]].numel() != 1:
            raise ValueError(f"{source}: {slot['alpha']!r} has shape {tuple(state[slot['alpha']].shape)}; an "
                             "alpha is one number")
        tensor_alpha = float(state[slot["alpha"]])
    scale = layer_scale(layer, down.shape[0], tensor_alpha, header_scale, source)
    magnitude, per_input = (_magnitude(source, slot["dora"], state[slot["dora"]], shape) if "dora" in slot
                            else (None, False))
    parsed.low_rank[name] = LowRank(down=down, up=up, scale=scale, magnitude=magnitude, per_input=per_input)
    if "bias" in slot:  # peft's lora_bias: the bias changes by scale * lora_B.bias
        bias = names.find(layer, "bias")
        if bias is None or state[slot["bias"]].shape != names.shapes[bias]:
            has = f"a bias of shape {tuple(names.shapes[bias])}" if bias else "no bias"
            misfits.append(f"{slot['bias']!r} has shape {tuple(state[slot['bias']].shape)}; the layer has {has}")
        else:
            parsed.diffs[bias] = state[slot["bias"]] * scale


def _fits(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> bool:
    """``up @ down`` has the layer's ``[out, in * kernel]`` size (linear and conv weights)."""
    return (all(s == 1 for s in up.shape[2:]) and len(shape) >= 2 and up.shape[0] == shape[0]
            and down[0].numel() == shape[1:].numel())


def _magnitude(source: str, key: str, magnitude: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, bool]:
    """A DoRA magnitude and whether it is per input channel. peft's ``lora_magnitude_vector`` is one
    value per output row (``[out]``, ``[1, out, 1...]`` for a conv); a ``dora_scale`` is on the
    output axis when its first length is the weight's (ComfyUI's rule), else one per input channel
    (``[1, in]``, LyCORIS' default)."""
    if key.endswith("dora_scale") and magnitude.shape[0] != shape[0]:
        if magnitude.numel() == shape[1]:
            return magnitude.reshape(-1), True
    elif magnitude.numel() == shape[0]:
        return magnitude.reshape(-1), False
    raise ValueError(f"{source}: DoRA magnitude {key!r} has shape {tuple(magnitude.shape)}; the layer's weight "
                     f"{tuple(shape)} needs one value per output row ({shape[0]}) or, as a dora_scale, "
                     f"[1, {shape[1]}] (one per input channel)")


def _check_size(parsed: ParsedLora, state: Mapping[str, torch.Tensor], module: nn.Module, misfits: list[str]) -> None:
    """Shapes that do not fit, or blocks the module lacks, mean a LoRA for another model size."""
    hint = size_hint(state, module) if misfits or parsed.unmatched else None
    if not misfits and not hint:
        return
    lines = misfits or [f"{key!r} names no layer of this network" for key in parsed.unmatched]
    more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
    raise ValueError(f"{parsed.source}: {len(lines)} LoRA tensors do not fit this {type(module).__name__}"
                     + (f"; {hint}" if hint else "") + ":\n  " + "\n  ".join(lines[:10]) + more)
