"""LoRA files in ``wan info`` and ``wan convert``: telling them from checkpoints, describing them, and
rewriting them in another layout at the same strength.

A file is a LoRA when every key is a low-rank factor, an ``.alpha``, a full delta (``.diff`` /
``.diff_b`` / ``.diff_m``), a diffusers ``lora_B.bias`` or a DoRA magnitude
(:func:`wan_runtime.lora.names.lora_key`); the DiT size it fits is read by
:func:`wan_runtime.lora.fit.lora_shape`. Converting reads it with
:func:`wan_runtime.lora.parse_lora` (which finds the scale in ``.alpha`` tensors or any header)
against a meta-built DiT of the size the factors imply, and writes it with
:func:`wan_runtime.lora.save_lora`, each layer's scale as an explicit alpha.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from wan_runtime.lora.fit import LoraShape


def _is_dora(key: str) -> bool:
    from wan_runtime.lora.names import lora_key

    return (lora_key(key) or ("", ""))[1] == "dora"


def is_lora_state(keys: list[str]) -> bool:
    """Whether every key is a LoRA tensor (factor, alpha, delta, lora bias or DoRA magnitude)."""
    from wan_runtime.lora.names import lora_key

    return bool(keys) and all(lora_key(k) is not None for k in keys)


def meta_dit(shape: LoraShape, source: Path) -> torch.nn.Module:
    """A meta-device WanDiT with the sizes the LoRA implies (defaults elsewhere), to parse it against."""
    from wan_models import DiTConfig, WanDiT

    if "dim" not in shape.sizes:
        raise ValueError(f"{source}: cannot tell the DiT size: the LoRA has no attention or FFN layer of a Wan DiT")
    vace = len(shape.vace_blocks)
    config = DiTConfig(num_heads=1, num_layers=max(shape.num_layers, vace, 1), image_input=shape.image,
                       vace_layers=tuple(range(vace)), **shape.sizes)
    with torch.device("meta"):
        return WanDiT(config)


def layout_of(keys: list[str]) -> str:
    """The naming a LoRA file uses, in words (several when it mixes them)."""
    kinds = Counter()
    for key in keys:
        if key.startswith("lora_unet_"):
            kinds["kohya/musubi (lora_unet_)"] += 1
        elif key.startswith(("diffusion_model.", "model.diffusion_model.")):
            kinds["comfy (diffusion_model.)"] += 1
        elif key.startswith("transformer."):
            kinds["diffusers (transformer.)"] += 1
        elif key.startswith("base_model.model."):
            kinds["peft (base_model.model.)"] += 1
        elif re.search(r"\.lora_[AB]\.[^.]+\.weight$", key):
            kinds["DiffSynth (lora_A.default)"] += 1
        else:
            kinds["official"] += 1
    return ", ".join(kind for kind, _ in kinds.most_common())


def _scale_origin(state: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> str:
    from wan_runtime.lora.layouts import ALPHA_KEY, RANK_KEY
    from wan_runtime.lora.scale import DIFFUSERS_KEY

    if any(k.endswith(".alpha") for k in state):
        return ".alpha tensors"
    if DIFFUSERS_KEY in header:
        return f"header {DIFFUSERS_KEY} (diffusers/peft)"
    if ALPHA_KEY in header:
        return f"header {RANK_KEY}/{ALPHA_KEY}"
    return "none in the file (alpha = rank, scale 1)"


def _counts(values: list, fmt: str = "{}") -> str:
    return ", ".join(f"{fmt.format(v)} ({n} layer{'s' if n > 1 else ''})" for v, n in Counter(values).most_common())


def _deltas(parsed) -> dict[str, torch.Tensor]:
    """The parsed full deltas that change something: diffusers files carry a zero ``lora_B.bias`` on
    every layer without a bias delta (peft's ``lora_bias`` is all or nothing)."""
    return {name: diff for name, diff in parsed.diffs.items() if bool(diff.any())}


def describe_lora(path: Path, stored: Mapping[str, torch.Tensor], echo) -> None:
    """``wan info`` of a LoRA file: layout, layers, ranks, scale, DoRA, the DiT it fits, its provenance."""
    from wan_runtime.lora import ARGS_KEY, BASE_KEY, parse_lora
    from wan_runtime.lora.fit import lora_shape
    from wan_runtime.lora.scale import read_header

    header = read_header(path)
    keys = list(stored)
    shape = lora_shape(stored)
    dora = any(_is_dora(k) for k in keys)
    echo(f"file:     {path}")
    echo(f"format:   LoRA, {layout_of(keys)} layout ({len(keys)} tensors)")
    if shape.unknown:
        listing = ", ".join(shape.unknown[:8]) + (" ..." if len(shape.unknown) > 8 else "")
        echo(f"unknown:  {len(shape.unknown)} keys name no Wan DiT layer: {listing}")
    if "dim" not in shape.sizes:
        echo("fits:     no Wan DiT: no attention or FFN layer tells its size")
    else:
        parsed = parse_lora(path, meta_dit(shape, path))
        ranks = [lr.down.shape[0] for lr in parsed.low_rank.values()]
        echo(f"layers:   {len(parsed.low_rank)} low-rank, {len(_deltas(parsed))} full deltas")
        if ranks:
            echo(f"rank:     {_counts(ranks)}")
            scales = [lr.scale for lr in parsed.low_rank.values()]
            alphas = [lr.scale * lr.down.shape[0] for lr in parsed.low_rank.values()]
            echo(f"scale:    alpha {_counts(alphas, '{:g}')}; alpha/rank {_counts(scales, '{:g}')}; "
                 f"from {_scale_origin(stored, header)}")
        sizes = ", ".join(f"{k} {v}" for k, v in sorted(shape.sizes.items()))
        echo(f"fits:     DiT {sizes}, {shape.num_layers} blocks (blocks named: {_ranges(shape.blocks)})"
             + (f", {len(shape.vace_blocks)} VACE blocks" if shape.vace_blocks else ""))
        models = shape.models()
        echo(f"matches:  {', '.join(models) if models else 'no registry model has these sizes'}")
    echo(f"DoRA:     {'yes (magnitude vectors)' if dora else 'no'}")
    if BASE_KEY in header:
        echo(f"trained for: {_base(header[BASE_KEY])}")
    if ARGS_KEY in header:
        echo(f"training args: {header[ARGS_KEY]}")


def _ranges(numbers: set[int]) -> str:
    ordered, parts = sorted(numbers), []
    for n in ordered:
        if parts and parts[-1][1] == n - 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


def _base(text: str) -> str:
    """BASE_KEY's JSON in words: 'wan2.2 high-noise expert of Wan2.2-T2V-A14B (t2v, dim 5120, 40 blocks)'."""
    try:
        base = json.loads(text)
    except json.JSONDecodeError:
        return f"(not JSON) {text}"
    if not isinstance(base, dict):
        return text
    words = str(base.get("family") or "unknown family")
    if base.get("expert"):
        words += f" {base['expert']}-noise expert"
    if base.get("model"):
        words += f" of {base['model']}"
    details = [str(base["variant"])] if base.get("variant") else []
    details += [f"dim {base['dim']}"] if base.get("dim") else []
    details += [f"{base['num_layers']} blocks"] if base.get("num_layers") else []
    return words + (f" ({', '.join(details)})" if details else "")


def convert_lora(source: Path, target: Path, to: str) -> str:
    """Rewrite LoRA file ``source`` in layout ``to`` at ``target``; returns a one-line summary.

    Raises ``ValueError`` naming the keys that fit no Wan DiT layer, DoRA magnitudes (no layout here
    writes them) or what the target layout cannot hold; nothing is written then."""
    import wan_models
    from wan_runtime.lora import ARGS_KEY, BASE_KEY, parse_lora, save_lora
    from wan_runtime.lora.fit import lora_shape

    stored = wan_models.read_state_dict(source)
    dora = [k for k in stored if _is_dora(k)]
    if dora:
        raise ValueError(f"{source}: a DoRA LoRA ({', '.join(dora[:3])} ...): its magnitudes have no place in the "
                         f"{to} layout; merge it instead")
    shape = lora_shape(stored)
    if shape.unknown:
        raise ValueError(f"{source}: {len(shape.unknown)} keys name no Wan DiT layer: {', '.join(shape.unknown[:8])}")
    parsed = parse_lora(source, meta_dit(shape, source))
    if parsed.unmatched:
        raise ValueError(f"{source}: keys match no layer of the DiT the file implies: "
                         f"{', '.join(parsed.unmatched[:8])}")
    state: dict[str, torch.Tensor] = {}
    for name, lr in parsed.low_rank.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = lr.down, lr.up
        alpha = lr.scale * lr.down.shape[0]
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{source}: layer {name} has scale {lr.scale}; only positive scales can be written")
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    deltas = _deltas(parsed)
    for param, diff in deltas.items():
        layer, _, attr = param.rpartition(".")
        key = {"weight": f"{layer}.diff", "bias": f"{layer}.diff_b"}.get(attr, f"{param}.diff")
        state[key] = diff
    metadata = {k: parsed.header[k] for k in (BASE_KEY, ARGS_KEY) if k in parsed.header}
    save_lora(target, state, to, metadata=metadata)
    return f"{len(parsed.low_rank)} low-rank layers, {len(deltas)} full deltas"
