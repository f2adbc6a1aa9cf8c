"""Which key format a state dict uses: the official release's, diffusers' or ComfyUI's."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from ..detect import NETWORKS
from . import comfy, diffusers

Format = Literal["official", "diffusers", "comfy"]
FORMATS: tuple[Format, ...] = ("official", "diffusers", "comfy")


def detect_format(state_dict: Mapping[str, Any]) -> Format:
    """``"comfy"`` for ComfyUI prefixes or quantisation keys, ``"diffusers"`` for diffusers' Wan DiT
    or VAE names, ``"official"`` for the released names of any Wan 2.1 network.

    Raises ``ValueError`` listing some of the keys when none of these fits.
    """
    if not state_dict:
        raise ValueError("empty state dict: no keys to tell its format from")
    if comfy.is_comfy(state_dict):
        return "comfy"
    if diffusers.is_diffusers(state_dict):
        return "diffusers"
    if any(key in state_dict for network in NETWORKS for key in network.signature):
        return "official"
    keys = sorted(state_dict)
    raise ValueError(f"unknown checkpoint format: its keys match no Wan 2.1 network in the official, diffusers "
                     f"or ComfyUI naming ({len(keys)} keys, e.g. {', '.join(keys[:6])})")
