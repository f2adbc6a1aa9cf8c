"""LoRA files in ``wan info`` and ``wan convert``: telling them from checkpoints, the DiT size their
factors imply, describing them, and rewriting them in another layout at the same strength.

A file is a LoRA when every key is a low-rank factor, an ``.alpha``, a full delta (``.diff`` /
``.diff_b``), a diffusers ``lora_B.bias`` or a DoRA magnitude. Converting reads it with
:func:`wan_runtime.lora.parse_lora` (which finds the scale in ``.alpha`` tensors or any header)
against a meta-built DiT of the size the factors imply, and writes it with
:func:`wan_runtime.lora.save_lora`, each layer's scale as an explicit alpha.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

_LORA_KEY = re.compile(r"(?P<target>.+?)\.(?:(?:lora_(?P<part>A|B|down|up))(?:\.[^.]+)?\.weight|(?P<bias>lora_B)"
                       r"(?:\.[^.]+)?\.bias|(?P<alpha>alpha)|(?P<diff>diff|diff_b)|(?P<dora>dora_scale|"
                       r"lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?))")
_BLOCK = re.compile(r"(?:^|[._])(?P<stack>vace_blocks|blocks)[._](?P<n>\d+)[._]")


def is_lora_state(keys: list[str]) -> bool:
    """Whether every key is a LoRA tensor (factor, alpha, delta, lora bias or DoRA magnitude)."""
    return bool(keys) and all(_LORA_KEY.fullmatch(k) for k in keys)


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


def _names(num_layers: int, vace: int, image: bool) -> tuple[set[str], dict[str, str]]:
    """Every parameter name of a Wan DiT with these parts (sizes do not change names), and their
    flattened (``_``) forms."""
    from wan_models import DiTConfig, WanDiT

    config = DiTConfig(num_layers=max(num_layers, vace, 1), image_input=image, vace_layers=tuple(range(vace)))
    with torch.device("meta"):
        names = {name for name, _ in WanDiT(config).named_parameters()}
    return names, {n.replace(".", "_"): n for n in names}


def _official_layer(target: str, names: set[str], flat: Mapping[str, str]) -> str | None:
    """The official name of the layer or parameter a file's target names (any naming), else None."""
    from wan_models.formats.diffusers import DIT_KEYS
    from wan_runtime.lora.parse import strip_prefixes

    for candidate in (target, strip_prefixes(target)):
        for attr in (".weight", ""):
            key = candidate + attr
            if key in names:
                return candidate
            if key.replace(".", "_") in flat:
                return flat[key.replace(".", "_")].removesuffix(attr) if attr else flat[key.replace(".", "_")]
            renamed = DIT_KEYS.rename(key, to_left=True)
            if renamed in names:
                return renamed.removesuffix(attr) if attr else renamed
    return None


PATCH = 4  # every Wan DiT's patch is 1 x 2 x 2: patch_embedding and head.head sizes are channels x 4
# official layer -> (DiTConfig field, the side of ``up @ down`` that holds it ("out"/"in"), divisor)
_SIZE_OF = (
    (re.compile(r"(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)"), "dim", "out", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.0"), "ffn_dim", "out", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.2"), "ffn_dim", "in", 1),
    (re.compile(r"(vace_)?blocks\.\d+\.ffn\.2"), "dim", "out", 1),
    (re.compile(r"(text|time)_embedding\.2|time_projection\.1|head\.head"), "dim", "in", 1),
    (re.compile(r"text_embedding\.0"), "text_dim", "in", 1),
    (re.compile(r"time_embedding\.0"), "freq_dim", "in", 1),
    (re.compile(r"patch_embedding"), "in_dim", "in", PATCH),
    (re.compile(r"head\.head"), "out_dim", "out", PATCH),
)


def lora_shape(state: Mapping[str, torch.Tensor]) -> LoraShape:
    """The DiT sizes (``dim``, ``ffn_dim``, ``text_dim``, ``freq_dim``), the blocks and the unknown keys
    of a LoRA state dict in any naming."""
    shape = LoraShape()
    for key in state:
        if m := _BLOCK.search(key):
            (shape.vace_blocks if m["stack"] == "vace_blocks" else shape.blocks).add(int(m["n"]))
    shape.image = any(part in k for k in state for part in ("k_img", "v_img", "add_k_proj", "add_v_proj", "img_emb"))
    names, flat = _names(shape.num_layers, len(shape.vace_blocks) and max(shape.vace_blocks) + 1, shape.image)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _LORA_KEY.fullmatch(key)
        layer = _official_layer(m["target"], names, flat) if m else None
        if layer is None:
            shape.unknown.append(key)
        elif m["part"]:
            factors.setdefault(layer, {})["down" if m["part"] in ("A", "down") else "up"] = tensor
        elif m["diff"] == "diff" and re.fullmatch(r"blocks\.\d+\.modulation", layer):
            shape.sizes.setdefault("dim", tensor.shape[-1])
    for layer, pair in factors.items():
        for pattern, size, side, divisor in _SIZE_OF:
            if pattern.fullmatch(layer):
                if side == "out" and "up" in pair:
                    shape.sizes.setdefault(size, pair["up"].shape[0] // divisor)
                elif side == "in" and "down" in pair:
                    shape.sizes.setdefault(size, pair["down"][0].numel() // divisor)
    return shape


def _fits(shape: LoraShape, config: object) -> bool:
    from wan_models import DiTConfig

    return (isinstance(config, DiTConfig) and all(getattr(config, k) == v for k, v in shape.sizes.items())
            and shape.num_layers <= config.num_layers and len(shape.vace_blocks) <= len(config.vace_layers))


def registry_fits(shape: LoraShape) -> list[str]:
    """The registry models whose DiT has every layer and size the LoRA names."""
    import wan_models

    return [name + (" (either expert)" if spec.experts else "") for name, spec in wan_models.MODELS.items()
            if _fits(shape, spec.config)]


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
    if any(k.endswith(".alpha") for k in state):
        return ".alpha tensors"
    if "lora_adapter_metadata" in header:
        return "header lora_adapter_metadata (diffusers/peft)"
    if "lora_alpha" in header:
        return "header lora_rank/lora_alpha"
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
    from wan_runtime.lora.scale import read_header

    header = read_header(path)
    keys = list(stored)
    shape = lora_shape(stored)
    dora = any(_LORA_KEY.fullmatch(k)["dora"] for k in keys)
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
        models = registry_fits(shape)
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
    from wan_runtime.lora.scale import read_header

    stored = wan_models.read_state_dict(source)
    dora = [k for k in stored if _LORA_KEY.fullmatch(k)["dora"]]
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
    header = read_header(source)
    metadata = {k: header[k] for k in (BASE_KEY, ARGS_KEY) if k in header}
    save_lora(target, state, to, metadata=metadata)
    return f"{len(parsed.low_rank)} low-rank layers, {len(deltas)} full deltas"
