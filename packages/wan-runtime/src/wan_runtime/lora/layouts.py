"""Writing a LoRA in the key layout another tool reads, with its scale where that tool looks for it.

The state given is in our names: ``<layer>.lora_A.weight`` (down, ``[r, in, ...]``) and
``<layer>.lora_B.weight`` (up, ``[out, r, 1...]``) for release layer names such as
``blocks.0.self_attn.q``, optionally ``<layer>.alpha`` (a scalar: that layer's alpha, overriding the
``alpha`` argument) and full deltas ``<param>.diff`` / ``<layer>.diff_b``. A layer's scale is
``alpha / rank``.

=========  ===========================================================================================
official   the same names. The scale is in a scalar ``<layer>.alpha`` tensor per layer (the
           kohya convention, which ComfyUI, musubi-tuner, diffusers' converter of such files and
           every version of our reader honour; header-only scales are lost on all of them) and, when
           every layer has the same rank and alpha, also in the header keys ``lora_rank`` /
           ``lora_alpha`` our trainer has always written.
diffusers  ``transformer.<diffusers layer>.lora_A.weight`` / ``.lora_B.weight`` (names from
           :data:`wan_models.formats.diffusers.DIT_KEYS`); the scale in the ``lora_adapter_metadata``
           header as diffusers itself saves it (diffusers 0.42.1 ``LoraBaseMixin.write_lora_layers``:
           peft ``LoraConfig`` fields prefixed ``transformer.``, JSON with sorted keys). A
           ``.diff_b`` becomes ``lora_B.bias`` (peft's ``lora_bias``; peft scales it like the
           product, so it is stored divided by the layer's scale; layers without one get zeros). diffusers
           cannot hold other deltas.
comfy      ``diffusion_model.<layer>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and
           ``.diff`` / ``.diff_b``: the names ComfyUI's loader maps for a WAN model
           (Comfy-Org/ComfyUI ``comfy/lora.py`` at 17358c8f, ``model_lora_keys_unet``: every
           ``diffusion_model.<layer>.weight`` is reachable as ``diffusion_model.<layer>``;
           ``comfy/weight_adapter/lora.py`` at 6f98b150 reads ``lora_up``/``lora_down`` with
           ``.alpha`` as ``alpha / rank``).
=========  ===========================================================================================
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from wan_models.formats.diffusers import DIT_KEYS

from ..files import atomic_path
from .names import PREFIXES
from .scale import DIFFUSERS_KEY, DIFFUSERS_PREFIX

LAYOUTS = ("official", "diffusers", "comfy")  # the same words as `wan convert --to`
BASE_KEY = "wan.base"  # JSON {"family", "expert", "variant", "dim", "num_layers", "model"}
ARGS_KEY = "wan.training_args"  # JSON object of the resolved training flags
RANK_KEY, ALPHA_KEY = "lora_rank", "lora_alpha"  # our trainer's header keys (official layout)
COMFY_PREFIX = "diffusion_model."

_KEY = re.compile(r"(?P<target>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha|diff|diff_b)")


@dataclass(frozen=True)
class _Layer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _number(value: float) -> int | float:
    """``16.0`` -> ``16`` (as our trainer and peft write integral alphas), other values unchanged."""
    return int(value) if float(value).is_integer() else float(value)


def _split(state: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[dict[str, _Layer], dict[str, torch.Tensor]]:
    """Our names -> low-rank layers (with their alphas) and full deltas (key -> tensor), checked."""
    bad = [k for k in state if not _KEY.fullmatch(k) or k.startswith(PREFIXES)]
    if bad:
        raise ValueError(f"{len(bad)} keys are not LoRA tensors in our names (<layer>.lora_A.weight / "
                         f".lora_B.weight / .alpha, <param>.diff / .diff_b, no prefix): {', '.join(sorted(bad)[:8])}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _KEY.fullmatch(key)
        if m["part"] in ("diff", "diff_b"):
            deltas[key] = tensor
        else:
            parts.setdefault(m["target"], {})[m["part"]] = tensor
    layers: dict[str, _Layer] = {}
    for target, found in parts.items():
        if "lora_A.weight" not in found or "lora_B.weight" not in found:
            have = ", ".join(f"{target}.{p}" for p in sorted(found))
            raise ValueError(f"layer {target!r} has {have} but not both lora_A.weight and lora_B.weight")
        down, up = found["lora_A.weight"], found["lora_B.weight"]
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0] or any(s != 1 for s in up.shape[2:]):
            raise ValueError(f"{target}: lora_B {tuple(up.shape)} and lora_A {tuple(down.shape)} are not the "
                             "factors [out, r] @ [r, in] of one layer")
        if "alpha" in found:
            if found["alpha"].numel() != 1:
                raise ValueError(f"{target}.alpha must be one number, not shape {tuple(found['alpha'].shape)}")
            layer_alpha = float(found["alpha"])
        else:
            layer_alpha = float(down.shape[0]) if alpha is None else float(alpha)
        if not math.isfinite(layer_alpha) or layer_alpha <= 0:
            raise ValueError(f"{target}: alpha {layer_alpha} must be a finite positive number")
        layers[target] = _Layer(down, up, layer_alpha)
    return layers, deltas


def _uniform(layers: Mapping[str, _Layer]) -> tuple[int, float] | None:
    """The rank and alpha every layer shares, or ``None``."""
    pairs = {(layer.rank, layer.alpha) for layer in layers.values()}
    return next(iter(pairs)) if len(pairs) == 1 else None


def _official(layers: Mapping[str, _Layer], deltas: Mapping[str, torch.Tensor], prefix: str, down: str,
              up: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out[f"{prefix}{name}.{down}.weight"] = layer.down
        out[f"{prefix}{name}.{up}.weight"] = layer.up
        out[f"{prefix}{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    out.update({prefix + key: tensor for key, tensor in deltas.items()})
    return out


def _diffusers_name(layer: str) -> str | None:
    renamed = DIT_KEYS.rename(f"{layer}.weight")
    return renamed.removesuffix(".weight") if renamed and renamed.endswith(".weight") else None


def _diffusers(layers: Mapping[str, _Layer], deltas: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    names = {layer: _diffusers_name(layer) for layer in layers}
    no_name = [f"{layer}.lora_A.weight" for layer, name in names.items() if name is None]
    no_delta = [key for key in deltas if not (key.endswith(".diff_b") and key.removesuffix(".diff_b") in layers)]
    if no_name or no_delta:
        raise ValueError("diffusers' Wan LoRA layout has no place for: " + ", ".join(sorted(no_name + no_delta)[:8])
                         + (" (only layers of WanTransformer3DModel, and a .diff_b only on a layer that also has "
                            "lora_A/lora_B)" if no_delta else " (no WanTransformer3DModel layer of that name)"))
    out: dict[str, torch.Tensor] = {}
    for layer, name in names.items():
        out[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = layers[layer].down
        out[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = layers[layer].up
    if deltas:  # peft's lora_bias gives every target a bias: zero where the LoRA has none (no missing keys)
        for layer, name in names.items():
            bias = deltas.get(f"{layer}.diff_b")
            scale = layers[layer].alpha / layers[layer].rank  # peft multiplies lora_B's bias by it too
            out[f"{DIFFUSERS_PREFIX}{name}.lora_B.bias"] = bias / scale if bias is not None else \
                layers[layer].up.new_zeros(layers[layer].up.shape[0])
    ranks = Counter(layer.rank for layer in layers.values())
    alphas = Counter(layer.alpha for layer in layers.values())
    r = ranks.most_common(1)[0][0] if ranks else 1
    lora_alpha = alphas.most_common(1)[0][0] if alphas else float(r)
    config: dict[str, object] = {
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "target_modules": sorted(names.values()),
        "rank_pattern": {names[n]: layer.rank for n, layer in layers.items() if layer.rank != r},
        "alpha_pattern": {names[n]: _number(layer.alpha) for n, layer in layers.items() if layer.alpha != lora_alpha},
        "use_dora": False,
    }
    if deltas:
        config["lora_bias"] = True
    packed = {DIFFUSERS_PREFIX + key: value for key, value in config.items()}
    return out, {DIFFUSERS_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def export_lora(state: Mapping[str, torch.Tensor], layout: str, *, alpha: float | None = None,
                metadata: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our names in (``blocks.0.self_attn.q.lora_A.weight`` / ``.lora_B.weight``, optionally ``.diff`` /
    ``.diff_b`` deltas) -> (tensors in ``layout``'s key names, the safetensors header that carries the scale
    ``alpha / rank`` the way that layout's own readers expect it, plus ``metadata`` passed through).
    ``alpha=None`` means alpha = rank (scale 1); a ``<layer>.alpha`` tensor in ``state`` sets that layer's.

    Raises ``ValueError`` naming the keys for an unknown layout, keys not in our names, a factor without
    its partner, and (diffusers) layers or deltas that layout cannot hold; nothing is returned then.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if alpha is not None and (not math.isfinite(float(alpha)) or float(alpha) <= 0):
        raise ValueError(f"alpha {alpha!r} must be a finite positive number (or None for alpha = rank)")
    if not state:
        raise ValueError("the LoRA state dict is empty")
    layers, deltas = _split(state, alpha)
    header = {"format": "pt"}
    if layout == "official":
        tensors = _official(layers, deltas, "", "lora_A", "lora_B")
        if (shared := _uniform(layers)) is not None:
            header[RANK_KEY], header[ALPHA_KEY] = str(shared[0]), str(_number(shared[1]))
    elif layout == "comfy":
        tensors = _official(layers, deltas, COMFY_PREFIX, "lora_down", "lora_up")
    else:
        tensors, scale_header = _diffusers(layers, deltas)
        header.update(scale_header)
    clash = sorted(k for k, v in (metadata or {}).items() if k in header and str(v) != header[k])
    if clash:
        raise ValueError(f"metadata keys {', '.join(clash)} are written by the {layout} layout itself")
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return {k: v.contiguous() for k, v in tensors.items()}, header


def save_lora(path: str | os.PathLike, state: Mapping[str, torch.Tensor], layout: str, *,
              alpha: float | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """:func:`export_lora`, then write a ``.safetensors`` file atomically (a temp name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file is written as .safetensors")
    tensors, header = export_lora(state, layout, alpha=alpha, metadata=metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path
