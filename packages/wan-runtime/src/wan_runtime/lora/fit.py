"""Which DiT a LoRA file was made for, read from its keys and factor shapes.

One reading serves the merge errors (a LoRA for another model size names the size it fits and the
registry models of that size) and ``wan info`` / ``wan convert`` (which build a meta DiT of that size
to parse the file against). Every key is mapped onto a Wan DiT's own layer names first
(:class:`.names.LayerNames`), so all namings give the same answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from wan_models import MODELS, DiTConfig, WanDiT

from .names import LayerNames, lora_key

_BLOCK = re.compile(r"(?:^|[._])(?P<stack>vace_blocks|blocks)[._](?P<n>\d+)[._]")
_IMAGE_PARTS = ("k_img", "v_img", "add_k_proj", "add_v_proj", "img_emb")
VACE_KEY = re.compile(r"(?:^|[._])vace[._](?:blocks|patch[._]embedding)[._]")
PATCH = 4  # every Wan DiT's patch is 1 x 2 x 2: patch_embedding and head.head sizes are channels x 4
# official layer -> (DiTConfig field, the side of ``up @ down`` that holds it ("out"/"in"), divisor)
_SIZE_OF = (
    (re.compile(r"(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)"), "dim", "out", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.0"), "ffn_dim", "out", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.0"), "dim", "in", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.2"), "ffn_dim", "in", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.2"), "dim", "out", 1),
    (re.compile(r"(text|time)_embedding\.2|time_projection\.1|head\.head"), "dim", "in", 1),
    (re.compile(r"text_embedding\.0"), "text_dim", "in", 1),
    (re.compile(r"time_embedding\.0"), "freq_dim", "in", 1),
    (re.compile(r"patch_embedding"), "in_dim", "in", PATCH),
    (re.compile(r"head\.head"), "out_dim", "out", PATCH),
)
_FIRST = ("dim", "ffn_dim")  # named first when describing a size


@dataclass
class LoraShape:
    """What a LoRA file's keys and shapes say about the DiT it was made for."""

    sizes: dict[str, int] = field(default_factory=dict)  # DiTConfig field -> value the factors imply
    blocks: set[int] = field(default_factory=set)
    vace_blocks: set[int] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)  # keys naming no Wan DiT layer
    image: bool = False  # the CLIP image branch (k_img / v_img / img_emb) has layers in the file

    @property
    def num_layers(self) -> int:
        return max(self.blocks) + 1 if self.blocks else 0

    def describe(self) -> str:
        """``dim 1536, ffn_dim 8960 with at least 30 blocks``."""
        return _describe(self.sizes) + (f" with at least {self.num_layers} blocks" if self.blocks else "")

    def fits(self, config: object) -> bool:
        """Whether ``config`` is a DiT with every size, block and VACE block the file names."""
        return (isinstance(config, DiTConfig) and all(getattr(config, k) == v for k, v in self.sizes.items())
                and self.num_layers <= config.num_layers and len(self.vace_blocks) <= len(config.vace_layers))

    def models(self) -> list[str]:
        """Registry names of the released DiTs this file fits (an A14B pair: "(either expert)")."""
        return [name + (" (either expert)" if spec.experts else "") for name, spec in MODELS.items()
                if self.fits(spec.config)]


def _describe(sizes: Mapping[str, int]) -> str:
    order = [k for k in _FIRST if k in sizes] + sorted(k for k in sizes if k not in _FIRST)
    return ", ".join(f"{k} {sizes[k]}" for k in order) or "unknown width"


def _names(num_layers: int, vace: int, image: bool) -> LayerNames:
    """The layer names of a Wan DiT with these parts (sizes do not change names), built on meta."""
    config = DiTConfig(num_layers=max(num_layers, vace, 1), image_input=image, vace_layers=tuple(range(vace)))
    with torch.device("meta"):
        return LayerNames(WanDiT(config))


def _layer(names: LayerNames, target: str) -> str | None:
    """The official name of the layer (or bare parameter) a file's target means, in any naming."""
    found = names.find(target, "weight")
    return found.removesuffix(".weight") if found else names.find(target, "")


def lora_shape(state: Mapping[str, torch.Tensor]) -> LoraShape:
    """The DiT sizes (``dim``, ``ffn_dim``, ``text_dim``, ``freq_dim``, ``in_dim``, ``out_dim``), the
    blocks and the keys naming no Wan DiT layer of a LoRA state dict in any naming."""
    shape = LoraShape()
    for key in state:
        if m := _BLOCK.search(key):
            (shape.vace_blocks if m["stack"] == "vace_blocks" else shape.blocks).add(int(m["n"]))
    shape.image = any(part in key for key in state for part in _IMAGE_PARTS)
    names = _names(shape.num_layers, max(shape.vace_blocks, default=-1) + 1, shape.image)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        target, part = lora_key(key) or (None, None)
        layer = _layer(names, target) if target else None
        if layer is None:
            shape.unknown.append(key)
        elif part in ("down", "up"):
            factors.setdefault(layer, {})[part] = tensor
        elif part == "diff" and re.fullmatch(r"blocks\.\d+\.modulation", layer):
            shape.sizes.setdefault("dim", tensor.shape[-1])
    for layer, pair in factors.items():
        for pattern, size, side, divisor in _SIZE_OF:
            if pattern.fullmatch(layer):
                if side == "out" and "up" in pair and pair["up"].ndim >= 2:
                    shape.sizes.setdefault(size, pair["up"].shape[0] // divisor)
                elif side == "in" and "down" in pair and pair["down"].ndim >= 2:
                    shape.sizes.setdefault(size, pair["down"][0].numel() // divisor)
    return shape


def size_hint(state: Mapping[str, torch.Tensor], module: nn.Module) -> str | None:
    """A sentence naming the size the file fits and the registry models of that size, when it is not
    the DiT's size; ``None`` when the sizes agree, the file does not tell, or ``module`` is no DiT."""
    config = getattr(module, "config", None)
    if not isinstance(config, DiTConfig):
        return None
    file = lora_shape(state)
    differs = any(getattr(config, k) != v for k, v in file.sizes.items())
    if not differs and file.num_layers <= config.num_layers:
        return None
    models = file.models()
    fits = f" ({', '.join(models)})" if models else " (no released Wan model has that size)"
    ours = _describe({k: getattr(config, k) for k in (*_FIRST, *file.sizes)})
    return f"the LoRA fits a DiT of {file.describe()}{fits}; this DiT has {ours} with {config.num_layers} blocks"


def vace_problem(state: Mapping[str, torch.Tensor], module: nn.Module) -> str | None:
    """A message when the file adapts VACE blocks and the module has none, else ``None``."""
    keys = sorted(key for key in state if VACE_KEY.search(key))
    if not keys or len(getattr(module, "vace_blocks", ())):
        return None
    vace = [name for name, spec in MODELS.items() if isinstance(spec.config, DiTConfig) and spec.config.vace_layers]
    return (f"{len(keys)} keys adapt VACE blocks (e.g. {', '.join(keys[:3])}), but this "
            f"{type(module).__name__} has no VACE blocks; load a VACE model ({', '.join(vace)}) to use this LoRA")
