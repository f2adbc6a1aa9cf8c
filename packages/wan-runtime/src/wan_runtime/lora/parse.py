"""Reading a LoRA file: every supported naming, mapped onto the layers of a network.

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
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from wan_models import WanDiT, read_state_dict
from wan_models.formats.diffusers import DIT_KEYS

from ..finite import check_finite

logger = logging.getLogger(__name__)

LoraSource = str | os.PathLike | Mapping[str, torch.Tensor]

# Prefixes trainers and converters put before the layer name; stripped one after another.
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")

_LOW_RANK = re.compile(r"(?P<target>.+)\.lora_(?P<part>A|B|down|up)(?:\.(?P<adapter>[^.]+))?\.weight")
_ALPHA = re.compile(r"(?P<target>.+)\.alpha")
_DIFF = re.compile(r"(?P<target>.+)\.(?P<part>diff|diff_b)")
_PART = {"A": "down", "down": "down", "B": "up", "up": "up"}


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


class LayerNames:
    """Finds the module's parameter that a file's layer name means, whatever the naming."""

    def __init__(self, module: nn.Module) -> None:
        self.shapes: dict[str, torch.Size] = {name: p.shape for name, p in module.named_parameters()}
        for name, layer in module.named_modules():
            if is_fp8_layer(layer):
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
    names = LayerNames(module)
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


def is_fp8_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` stores its weight as ``weight_fp8 * scale`` buffers (e.g. ``FP8Linear``)."""
    return isinstance(getattr(layer, "weight_fp8", None), torch.Tensor) and \
        isinstance(getattr(layer, "scale", None), torch.Tensor)
