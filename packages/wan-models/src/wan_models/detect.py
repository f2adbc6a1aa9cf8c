"""Which network a state dict holds and at which sizes, read from key names and tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import clip, t5, vae, vae22
from .dit import WanDiT
from .dit_config import dit_config_from_state_dict, motion_controller_config_from_state_dict
from .motion_controller import MotionController


@dataclass(frozen=True)
class Network:
    """How one kind of network is recognised, configured and built from official-format keys."""

    name: str
    signature: tuple[str, ...]                   # keys (any one) that identify it
    config_from_state_dict: Callable[..., Any]
    module: type[nn.Module]
    module_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict  # file keys -> module keys


NETWORKS: tuple[Network, ...] = (
    Network("dit", ("blocks.0.self_attn.q.weight",), dit_config_from_state_dict, WanDiT),
    # Before "vae": a Wan2.2 VAE also has encoder.conv1.weight; its stages nest their blocks.
    Network("vae22", ("encoder.downsamples.0.downsamples.0.residual.0.gamma",), vae22.config_from_state_dict,
            vae22.WanVAE22),
    Network("vae", ("encoder.conv1.weight",), vae.config_from_state_dict, vae.WanVAE),
    Network("t5", ("token_embedding.weight",), t5.config_from_state_dict, t5.UMT5Encoder),
    Network("clip", ("visual.patch_embedding.weight", "transformer.0.attn.to_qkv.weight"),
            clip.config_from_state_dict, clip.CLIPVisionTower, clip.visual_state_dict),
    Network("motion_controller", ("linear.4.weight",), motion_controller_config_from_state_dict,
            MotionController),
)


def detect_network(sd: Mapping[str, Any]) -> Network:
    """The network whose signature keys appear in ``sd`` (official key names)."""
    for network in NETWORKS:
        if any(key in sd for key in network.signature):
            return network
    raise ValueError(f"unrecognised checkpoint: its keys match no Wan network (DiT, Wan 2.1 or 2.2 VAE, umT5, "
                     f"CLIP, motion controller); first keys: {sorted(sd)[:8]}")


def detect_config(sd: Mapping[str, Any], **hints: Any) -> Any:
    """Config of the network in ``sd``: a ``DiTConfig``, ``VAEConfig``, ``T5Config``, ... .

    ``hints`` pass sizes that shapes cannot show, e.g. ``num_heads`` of a DiT.
    """
    return detect_network(sd).config_from_state_dict(sd, **hints)
