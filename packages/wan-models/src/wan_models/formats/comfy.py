"""ComfyUI's single-file layouts: official keys under a network prefix, weights often in fp8.

ComfyUI stores the Wan DiT with the official key names, in whole checkpoints under
``model.diffusion_model.`` and the VAE under ``vae.`` (older checkpoints: ``first_stage_model.``);
its split files (``models/diffusion_models``, ``models/vae``) may carry the keys bare. Its umT5 and
CLIP files use transformers' layouts, which are not handled here. Repackaged and community files
store the weights in fp16, bf16 or ``float8_e4m3fn``; "scaled" fp8 files keep a per-tensor scale
beside each quantised weight, so the weight is ``fp8_value * scale``:

* legacy scaled fp8: ``<layer>.scale_weight`` (and ``<layer>.scale_input``, an activation scale,
  plus a ``scaled_fp8`` marker tensor, under the network prefix when there is one);
* ComfyUI mixed precision: ``<layer>.weight_scale`` with a ``<layer>.comfy_quant`` JSON config
  (and ``<layer>.input_scale``).

The same holds for Wan 2.2: the TI2V-5B DiT and the A14B experts are Wan DiTs in official keys
(ComfyUI tells TI2V-5B by its 48 output channels), and ComfyUI's ``wan2.2_vae.safetensors`` is the
official ``Wan2.2_VAE.pth`` keys without prefix (ComfyUI tells it from the Wan 2.1 VAE by the
nested ``decoder.upsamples.0.upsamples.0.residual.2.weight``).

Reading strips the prefix and dequantises (in float32, then cast to the requested dtype); the
activation scales and markers are dropped, as weights-only inference does not use them. Writing
adds the whole-checkpoint prefix (``vae.`` for either VAE; a file for ComfyUI's ``models/vae``
folder is the official layout); :func:`quantize_fp8` makes a legacy scaled (or plain) fp8 file.
"""

from __future__ import annotations

import json
import logging
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

DIT_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("vae.", "first_stage_model.")
PREFIXES = (DIT_PREFIX, *VAE_PREFIXES)
# The network names of ``wan_models.detect``; "vae22" is the Wan 2.2 VAE.
WRITE_PREFIX = {"dit": DIT_PREFIX, "vae": VAE_PREFIXES[0], "vae22": VAE_PREFIXES[0]}

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")       # weight = stored * scale
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, configs
MARKER = "scaled_fp8"
SUPPORTED_QUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def is_quant_key(key: str) -> bool:
    """A key that carries quantisation data rather than a weight of the network."""
    return key == MARKER or key.endswith(("." + MARKER, *SCALE_SUFFIXES, *DROPPED_SUFFIXES, ".weight_scale_2"))


def is_comfy(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sd`` has ComfyUI network prefixes or ComfyUI quantisation keys."""
    return any(k.startswith(PREFIXES) or is_quant_key(k) for k in sd)


def strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys without their ComfyUI network prefix; raises if ``sd`` holds several networks."""
    found = {p for p in PREFIXES if any(k.startswith(p) for k in sd)}
    if not found:
        return dict(sd)
    if len(found) > 1:
        raise ValueError(f"this ComfyUI file holds several networks ({', '.join(sorted(found))}); "
                         "load one network file at a time")
    prefix = found.pop()
    others = [k for k in sd if not k.startswith(prefix) and k != MARKER]
    if others:
        raise ValueError(f"keys outside {prefix!r} in a ComfyUI file (another network?): {sorted(others)[:5]}")
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def upcast_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype to turn fp8 weights into when none is asked for: that of the file's other floating
    tensors (float32 if they differ, bfloat16 if there are none). ``None`` when nothing is fp8."""
    if not any(v.dtype in FP8_DTYPES for k, v in sd.items() if not is_quant_key(k)):
        return None
    others = {v.dtype for k, v in sd.items()
              if not is_quant_key(k) and v.is_floating_point() and v.dtype not in FP8_DTYPES}
    if not others:
        return torch.bfloat16
    return others.pop() if len(others) == 1 else torch.float32


def _check_quant_config(key: str, value: torch.Tensor) -> None:
    try:
        config = json.loads(bytes(value.tolist()).decode("utf-8"))
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{key}: not a JSON quantisation config ({e})") from None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt not in SUPPORTED_QUANT_FORMATS:
        raise ValueError(f"{key}: quantisation format {fmt!r} is not supported (only {SUPPORTED_QUANT_FORMATS})")


def _apply_scale(key: str, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if scale.numel() != 1:
        raise ValueError(f"{key}: expected one scale per tensor, got shape {tuple(scale.shape)}")
    return (weight.to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype)


def dequantize(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Weights as ``dtype`` floats (default :func:`upcast_dtype`): scaled fp8 weights are multiplied
    by their scales, plain fp8 ones cast; quantisation keys are dropped. Other tensors are kept as
    they are (the same objects)."""
    if any(k.endswith(".weight_scale_2") for k in sd):
        raise ValueError("NVFP4 weights (.weight_scale_2) are not supported; use an fp8, fp16 or bf16 file")
    dtype = dtype or upcast_dtype(sd) or torch.float32
    scales = {}
    for key, value in sd.items():
        if key.endswith(".comfy_quant"):
            _check_quant_config(key, value)
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            weight_key = key[: -len(suffix)] + ".weight"
            if weight_key not in sd:
                raise ValueError(f"{key} scales a weight the file lacks ({weight_key})")
            scales[weight_key] = value
    out: dict[str, torch.Tensor] = {}
    plain = 0
    for key, value in sd.items():
        if is_quant_key(key):
            continue
        if key in scales:
            out[key] = _apply_scale(key, value, scales[key], dtype)
        elif value.dtype in FP8_DTYPES:
            out[key] = value.to(dtype)
            plain += 1
        else:
            out[key] = value
    if scales or plain:
        logger.info("dequantised %d scaled and %d plain fp8 tensors to %s", len(scales), plain, dtype)
    return out


def to_official(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Prefix stripped and weights dequantised; the keys inside are whatever format the file used."""
    return dequantize(strip_prefix(sd), dtype)


def from_official(sd: Mapping[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """ComfyUI keys (prefix added, same tensors) for an official DiT (``"dit"``) or VAE (``"vae"``,
    ``"vae22"``), as a whole ComfyUI checkpoint holds them."""
    if network not in WRITE_PREFIX:
        raise ValueError(f"ComfyUI keeps only the DiT and the VAEs in official keys, not a {network!r} "
                         f"(expected one of {', '.join(WRITE_PREFIX)})")
    prefix = WRITE_PREFIX[network]
    return {prefix + k: v for k, v in sd.items()}


def quantize_fp8(sd: Mapping[str, torch.Tensor], *, scaled: bool = True) -> dict[str, torch.Tensor]:
    """Linear weights (2-D ``*.weight``) stored as ``float8_e4m3fn``, as ComfyUI's fp8 files do.

    ``scaled`` adds a float32 ``<layer>.scale_weight`` per weight (its max magnitude / 448) and the
    ``scaled_fp8`` marker (legacy scaled-fp8 layout); otherwise values are cast as they are, losing
    magnitudes below e4m3's smallest step (2**-9). Other tensors are kept (the same objects).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not (key.endswith(".weight") and value.dim() == 2 and value.is_floating_point()):
            out[key] = value
        elif scaled:
            scale = (value.abs().max().to(torch.float32) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            out[key] = (value.to(torch.float32) / scale).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = value.to(torch.float8_e4m3fn)
    if scaled:
        out[MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out
