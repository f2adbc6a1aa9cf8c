"""Checkpoint key formats: the official release's, diffusers' and ComfyUI's, and conversion between them.

The networks of ``wan_models`` use the official key names. :func:`to_official` renames a diffusers
or ComfyUI state dict to them (dequantising ComfyUI's fp8 weights); :func:`convert` writes any of
the three formats. Renaming keeps the tensor objects, so conversion copies no weights.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..detect import detect_network
from . import comfy, diffusers
from .comfy import upcast_dtype
from .detect import FORMATS, Format, detect_format

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "Format", "comfy", "convert", "detect_format", "diffusers", "to_official", "upcast_dtype"]


def to_official(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``state_dict`` (any known format) with official keys; fp8 weights become ``dtype`` floats
    (default :func:`upcast_dtype`), other tensors are the same objects."""
    fmt = detect_format(state_dict)
    if fmt == "comfy":
        state_dict = comfy.to_official(state_dict, dtype)
        fmt = detect_format(state_dict)
    if fmt == "diffusers":
        logger.info("renaming %d diffusers keys to the official names", len(state_dict))
        return diffusers.to_official(state_dict)
    return dict(state_dict)


def convert(state_dict: Mapping[str, torch.Tensor], to: Format = "official", *,
            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``state_dict`` (official, diffusers or ComfyUI keys) in the format ``to``.

    diffusers has layouts for the DiT and the VAE only; ComfyUI output adds its network prefix.
    ``dtype`` is what fp8 weights of a ComfyUI input are dequantised to (see :func:`to_official`).
    """
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}; expected one of {FORMATS}")
    official = to_official(state_dict, dtype)
    if to == "diffusers":
        return diffusers.from_official(official)
    if to == "comfy":
        return comfy.from_official(official, detect_network(official).name)
    return official
