"""Which DiT a LoRA file was made for, read from its tensors, for errors that say what would fit.

From the factors of the attention and feed-forward layers a file gives away the width (``dim``),
the feed-forward width (``ffn_dim``) and, from its block numbers, how many blocks it covers at
least; the registry (:data:`wan_models.MODELS`) names the released models of that size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from wan_models import MODELS, DiTConfig

_SEP = r"[._]"
_BLOCK = re.compile(rf"(?:^|{_SEP})(?P<vace>vace{_SEP})?blocks{_SEP}(?P<index>\d+){_SEP}")
# (pattern of a layer name, which factor, which side of it) -> what that side's length is
_ATTN = rf"(?:self{_SEP}attn{_SEP}[qkvo]|attn1{_SEP}to{_SEP}(?:q|k|v|out{_SEP}0))"
_FFN_IN = rf"(?:ffn{_SEP}0|ffn{_SEP}net{_SEP}0{_SEP}proj)"
_FFN_OUT = rf"(?:ffn{_SEP}2|ffn{_SEP}net{_SEP}2)"
_UP = rf"{_SEP}lora{_SEP}(?:B|up)"
_DOWN = rf"{_SEP}lora{_SEP}(?:A|down)"
_SIDES = ((re.compile(_ATTN + _UP), 0, "dim"), (re.compile(_ATTN + _DOWN), 1, "dim"),
          (re.compile(_FFN_IN + _UP), 0, "ffn_dim"), (re.compile(_FFN_OUT + _DOWN), 1, "ffn_dim"),
          (re.compile(_FFN_IN + _DOWN), 1, "dim"), (re.compile(_FFN_OUT + _UP), 0, "dim"))
VACE_KEY = re.compile(rf"(?:^|{_SEP})vace{_SEP}(?:blocks|patch{_SEP}embedding){_SEP}")


@dataclass(frozen=True)
class Size:
    """What a file's tensors say about the DiT it was made for (``None``: the file does not say)."""

    dim: int | None
    ffn_dim: int | None
    blocks: int | None  # highest block number + 1

    def describe(self) -> str:
        parts = [f"dim {self.dim}" if self.dim else None, f"ffn_dim {self.ffn_dim}" if self.ffn_dim else None]
        size = ", ".join(p for p in parts if p) or "unknown width"
        return size + (f" with at least {self.blocks} blocks" if self.blocks else "")

    def models(self) -> list[str]:
        """Registry names of the released DiTs this size fits."""
        return [name for name, spec in MODELS.items() if isinstance(spec.config, DiTConfig)
                and self.dim in (None, spec.config.dim) and self.ffn_dim in (None, spec.config.ffn_dim)
                and (self.blocks or 0) <= spec.config.num_layers]


def file_size(state: Mapping[str, torch.Tensor]) -> Size:
    """Read dim, ffn_dim and the block count from a LoRA file's keys and factor shapes (the most
    common value where layers disagree)."""
    seen: dict[str, dict[int, int]] = {"dim": {}, "ffn_dim": {}}
    blocks = None
    for key, tensor in state.items():
        m = _BLOCK.search(key)
        if m and not m["vace"]:
            blocks = max(blocks or 0, int(m["index"]) + 1)
        if tensor.ndim < 2:
            continue
        for pattern, side, what in _SIDES:
            if pattern.search(key):
                length = tensor.shape[side]
                seen[what][length] = seen[what].get(length, 0) + 1
                break
    common = {what: max(counts, key=counts.get) if counts else None for what, counts in seen.items()}
    return Size(common["dim"], common["ffn_dim"], blocks)


def module_size(module: nn.Module) -> Size:
    """The same for the network a LoRA is merged into (its config when it is a DiT)."""
    config = getattr(module, "config", None)
    if isinstance(config, DiTConfig):
        return Size(config.dim, config.ffn_dim, config.num_layers)
    return file_size({f"{name}.lora_B.weight": p for name, p in module.named_parameters() if p.ndim >= 2})


def size_hint(state: Mapping[str, torch.Tensor], module: nn.Module) -> str | None:
    """A sentence naming the size the file fits and the registry models of that size, when it is not
    the module's size; ``None`` when the sizes agree (or the file does not tell)."""
    file, ours = file_size(state), module_size(module)
    differs = any(a is not None and b is not None and a != b for a, b in
                  ((file.dim, ours.dim), (file.ffn_dim, ours.ffn_dim)))
    if not differs and not (file.blocks and ours.blocks and file.blocks > ours.blocks):
        return None
    models = file.models()
    fits = f" ({', '.join(models)})" if models else " (no released Wan model has that size)"
    return f"the LoRA fits a DiT of {file.describe()}{fits}; this DiT has {ours.describe().replace('at least ', '')}"


def vace_problem(state: Mapping[str, torch.Tensor], module: nn.Module) -> str | None:
    """A message when the file adapts VACE blocks and the module has none, else ``None``."""
    keys = sorted(key for key in state if VACE_KEY.search(key))
    if not keys or len(getattr(module, "vace_blocks", ())):
        return None
    vace = [name for name, spec in MODELS.items() if isinstance(spec.config, DiTConfig) and spec.config.vace_layers]
    return (f"{len(keys)} keys adapt VACE blocks (e.g. {', '.join(keys[:3])}), but this "
            f"{type(module).__name__} has no VACE blocks; load a VACE model ({', '.join(vace)}) to use this LoRA")
