"""LoRA files in the key layout of the LightX2V / Wan2.2-Lightning releases, and the merge they mean, written
out by hand (not by wan_runtime.lora) so tests can compare a merged DiT against it.

The released few-step LoRAs name each layer ``diffusion_model.<official layer name>`` with
``.lora_down.weight`` [rank, in], ``.lora_up.weight`` [out, rank] and a scalar ``.alpha``, plus full
deltas: ``.diff`` for a norm's weight and ``.diff_b`` for a linear layer's bias (as the LightX2V and
ComfyUI loaders read them: ``W += strength * alpha / rank * up @ down``, ``P += strength * diff``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

LOW_RANK_LAYERS = ("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2")
PREFIX = "diffusion_model."


def lightx2v_lora(path: Path, shapes: Mapping[str, torch.Size], seed: int, rank: int = 4,
                  alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """Write a LoRA for a DiT whose parameters have ``shapes`` (every block) to ``path``; returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    blocks = sorted({int(name.split(".")[1]) for name in shapes if name.startswith("blocks.")})
    for i in blocks:
        for layer in LOW_RANK_LAYERS:
            out_dim, in_dim = shapes[f"blocks.{i}.{layer}.weight"]
            key = f"{PREFIX}blocks.{i}.{layer}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        bias = shapes[f"blocks.{i}.self_attn.q.bias"]
        tensors[f"{PREFIX}blocks.{i}.self_attn.q.diff_b"] = torch.randn(bias, generator=gen) * 0.1
        norm = shapes[f"blocks.{i}.norm3.weight"]
        tensors[f"{PREFIX}blocks.{i}.norm3.diff"] = torch.randn(norm, generator=gen) * 0.1
    save_file(tensors, str(path))
    return tensors


def merged_by_hand(weights: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
                   strength: float) -> dict[str, torch.Tensor]:
    """``weights`` (float32 copies) with the LoRA added at ``strength``, as the formulas above say."""
    out = {name: w.detach().float().clone() for name, w in weights.items()}
    for key, tensor in lora.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(".lora_down.weight"):
            layer = name.removesuffix(".lora_down.weight")
            up = lora[f"{PREFIX}{layer}.lora_up.weight"]
            scale = float(lora[f"{PREFIX}{layer}.alpha"]) / tensor.shape[0]
            out[f"{layer}.weight"] += strength * scale * (up @ tensor)
        elif name.endswith(".diff_b"):
            out[name.removesuffix(".diff_b") + ".bias"] += strength * tensor
        elif name.endswith(".diff"):
            out[name.removesuffix(".diff") + ".weight"] += strength * tensor
    return out
