"""The names in a LoRA file: which keys are LoRA tensors, and which layer of a network each one means.

A key is ``<target>.<part>``: the target is a layer (or bare parameter) in any naming (ours, peft,
DiffSynth, kohya/ComfyUI, diffusers), the part one of the tensors listed in :mod:`.parse`.
:class:`LayerNames` maps a target onto the module's own parameter names.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterator

import torch
from torch import nn

from wan_models import WanDiT
from wan_models.formats.diffusers import DIT_KEYS

# Prefixes trainers and converters put before the layer name; stripped one after another.
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")

LOW_RANK = re.compile(r"(?P<target>.+)\.lora_(?P<part>A|B|down|up)(?:\.(?P<adapter>[^.]+))?\.weight")
LORA_BIAS = re.compile(r"(?P<target>.+)\.lora_B(?:\.(?P<adapter>[^.]+))?\.bias")
DORA = re.compile(r"(?P<target>.+)\.(?:lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?|dora_scale)")
ALPHA = re.compile(r"(?P<target>.+)\.alpha")
DIFF = re.compile(r"(?P<target>.+)\.(?P<part>diff|diff_b|diff_m)")
# The tensors that belong to one layer, and their slot (None: down or up, by PART).
SLOTS = ((LOW_RANK, None), (LORA_BIAS, "bias"), (DORA, "dora"), (ALPHA, "alpha"))
PART = {"A": "down", "down": "down", "B": "up", "up": "up"}
_ALL = (*SLOTS, (DIFF, "diff"))


def lora_key(key: str) -> tuple[str, str] | None:
    """``(target, part)`` of a LoRA tensor's key, part being down, up, bias, dora, alpha, diff, diff_b
    or diff_m; ``None`` when the key is no LoRA tensor."""
    for regex, part in _ALL:
        if m := regex.fullmatch(key):
            return m["target"], (m["part"] if part == "diff" else part or PART[m["part"]])
    return None


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
        if m := DIFF.fullmatch(key):  # a parameter
            suffix = ".bias" if m["part"] == "diff_b" else ""
            pool = [name.removesuffix(suffix) for name in self.shapes if name.endswith(suffix)]
        elif m := LOW_RANK.fullmatch(key) or ALPHA.fullmatch(key):  # a layer
            pool = [name.removesuffix(".weight") for name in self.shapes if name.endswith(".weight")]
        else:
            return "not a LoRA tensor"
        by_dots = {name.replace("_", "."): name for name in pool}
        query = strip_prefixes(m["target"]).replace("_", ".")
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


def strip_prefixes(name: str) -> str:
    """``name`` with every known leading prefix removed."""
    *_, last = _unprefixed(name)
    return last


def is_fp8_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` stores its weight as ``weight_fp8 * scale`` buffers (e.g. ``FP8Linear``)."""
    return isinstance(getattr(layer, "weight_fp8", None), torch.Tensor) and \
        isinstance(getattr(layer, "scale", None), torch.Tensor)
