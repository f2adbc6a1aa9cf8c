"""diffusers' layouts of the Wan 2.1 and Wan 2.2 VAEs (``AutoencoderKLWan``), to and from the official keys.

Both VAEs are ``AutoencoderKLWan`` in diffusers; the Wan 2.2 one is built with ``is_residual=True``
(plus ``patch_size=2``, 12 in/out channels because the 2x2 patchify happens outside the encoder
and decoder convs, and a ``decoder_base_dim`` of its own). Converting is renaming only.

Wan 2.1: the encoder's flat ``downsamples.N`` list keeps its numbering as ``down_blocks.N``; the
decoder's flat ``upsamples.N`` list is regrouped as ``up_blocks.L.resnets.J`` / ``upsamplers.0``.
Wan 2.2: each official stage ``{en,de}coder.{down,up}samples.I.{down,up}samples.J`` becomes
``down_blocks.I.resnets.J`` / ``down_blocks.I.downsampler`` and ``up_blocks.I.resnets.J`` /
``up_blocks.I.upsampler``; the ``AvgDown3D`` / ``DupUp3D`` shortcuts hold no weights on either side.
The counts these layouts depend on are read from the keys. This module never imports diffusers.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, TypeVar

from ..vae import VAEConfig
from ..vae22 import PATCH, VAE22Config
from .keymap import KeyMap

V = TypeVar("V")

# The parts of one layer, by kind of layer: (official, diffusers).
_RESIDUAL = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.{p}", "conv1.{p}"),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.{p}", "conv2.{p}"),
    ("shortcut.{p}", "conv_shortcut.{p}"),
)
_ATTENTION = (("norm.gamma", "norm.gamma"), ("to_qkv.{p}", "to_qkv.{p}"), ("proj.{p}", "proj.{p}"))
_RESAMPLE = (("resample.1.{p}", "resample.1.{p}"), ("time_conv.{p}", "time_conv.{p}"))
_CONV = (("{p}", "{p}"),)
_NORM = (("gamma", "gamma"),)

# Layers both VAEs name alike: (official, diffusers, its parts).
_SHARED_PLACES = (
    ("conv1", "quant_conv", _CONV),
    ("conv2", "post_quant_conv", _CONV),
    ("{coder}.conv1", "{coder}.conv_in", _CONV),
    ("{coder}.middle.0", "{coder}.mid_block.resnets.0", _RESIDUAL),
    ("{coder}.middle.1", "{coder}.mid_block.attentions.0", _ATTENTION),
    ("{coder}.middle.2", "{coder}.mid_block.resnets.1", _RESIDUAL),
    ("{coder}.head.0", "{coder}.norm_out", _NORM),
    ("{coder}.head.2", "{coder}.conv_out", _CONV),
)
# Wan 2.1's encoder list keeps its numbering in diffusers.
_ENCODER21 = (("encoder.downsamples.{n}", "encoder.down_blocks.{n}", _RESIDUAL + _ATTENTION + _RESAMPLE),)


def _keymap(places: Any) -> KeyMap:
    return KeyMap(((f"{official}.{official_part}", f"{theirs}.{their_part}")
                   for official, theirs, parts in places for official_part, their_part in parts),
                  "official", "diffusers")

# ---- Wan 2.1 ----------------------------------------------------------------------------------

_OFFICIAL_DECODER_LAYER = re.compile(r"decoder\.upsamples\.(\d+)\..+")
_DIFFUSERS_DECODER_LAYER = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\..+")


def _decoder_places(levels: int, blocks_per_level: int) -> list[tuple[str, str, tuple]]:
    """Each Wan 2.1 decoder level is ``blocks_per_level`` residual blocks and then one upsampler
    (none after the last level): official ``upsamples.N`` is slot ``N % (blocks_per_level + 1)`` of
    level ``N // (blocks_per_level + 1)``. diffusers has no attention in these levels."""
    places = []
    for level in range(levels):
        for slot in range(blocks_per_level + 1):
            official = f"decoder.upsamples.{level * (blocks_per_level + 1) + slot}"
            if slot < blocks_per_level:
                places.append((official, f"decoder.up_blocks.{level}.resnets.{slot}", _RESIDUAL))
            else:
                places.append((official, f"decoder.up_blocks.{level}.upsamplers.0", _RESAMPLE))
    return places


def _decoder_layout(keys: Mapping[str, Any], *, official: bool) -> tuple[int, int]:
    """``(levels, residual blocks per level)`` of a Wan 2.1 VAE decoder, read from its keys."""
    if official:
        layers = sorted({int(m.group(1)) for k in keys if (m := _OFFICIAL_DECODER_LAYER.fullmatch(k))})
        upsamplers = [i for i in layers if f"decoder.upsamples.{i}.resample.1.weight" in keys]
        per_level = upsamplers[0] if upsamplers else len(layers)
        return (max(layers) // (per_level + 1) + 1 if layers else 0), per_level
    found = [m.groups() for k in keys if (m := _DIFFUSERS_DECODER_LAYER.fullmatch(k))]
    levels = len({level for level, _ in found})
    per_level = len({resnet for level, resnet in found if level == "0" and resnet is not None})
    return levels, per_level


def vae_keys(levels: int, blocks_per_level: int) -> KeyMap:
    """The official <-> diffusers key map of a Wan 2.1 VAE whose decoder has this layout."""
    return _keymap((*_SHARED_PLACES, *_ENCODER21, *_decoder_places(levels, blocks_per_level)))

# ---- Wan 2.2 ----------------------------------------------------------------------------------


def vae22_keys(stages: int, num_res_blocks: int) -> KeyMap:
    """The official <-> diffusers key map of a Wan 2.2 VAE with ``stages`` encoder (and decoder)
    stages of ``num_res_blocks`` residual blocks (the decoder's stages have one more)."""
    places: list[tuple[str, str, tuple]] = list(_SHARED_PLACES)
    for i in range(stages):
        down, up = f"encoder.downsamples.{i}.downsamples", f"decoder.upsamples.{i}.upsamples"
        places += [(f"{down}.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _RESIDUAL) for j in range(num_res_blocks)]
        places.append((f"{down}.{num_res_blocks}", f"encoder.down_blocks.{i}.downsampler", _RESAMPLE))
        places += [(f"{up}.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _RESIDUAL) for j in range(num_res_blocks + 1)]
        places.append((f"{up}.{num_res_blocks + 1}", f"decoder.up_blocks.{i}.upsampler", _RESAMPLE))
    return _keymap(places)


def _indices(keys: Mapping[str, Any], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := regex.match(k))}


def _vae22_layout(keys: Mapping[str, Any], *, official: bool) -> tuple[int, int]:
    """``(stages, residual blocks per encoder stage)`` of a Wan 2.2 VAE, read from its keys."""
    if official:
        stages = _indices(keys, r"encoder\.downsamples\.(\d+)\.")
        blocks = _indices(keys, r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.")
    else:
        stages = _indices(keys, r"encoder\.down_blocks\.(\d+)\.")
        blocks = _indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return len(stages), len(blocks)

# ---- state dicts ----------------------------------------------------------------------------

VAE_SIGNATURES = ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight")
# Keys that only the Wan 2.2 layouts have (residual stages).
VAE22_DIFFUSERS_SIGNATURE = "encoder.down_blocks.0.resnets.0.conv1.weight"
VAE22_OFFICIAL_SIGNATURE = "encoder.downsamples.0.downsamples.0.residual.2.weight"
OFFICIAL_VAE = ("encoder.conv1.weight", "decoder.conv1.weight")


def is_diffusers_vae(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` has diffusers' ``AutoencoderKLWan`` key names (either VAE)."""
    return any(k in sd for k in VAE_SIGNATURES)


def is_official_vae(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` has the released key names of a Wan 2.1 or 2.2 VAE."""
    return any(k in sd for k in OFFICIAL_VAE)


def vae_to_official(sd: Mapping[str, V]) -> dict[str, V]:
    """Official keys for a diffusers Wan 2.1 or 2.2 VAE state dict; same values."""
    if VAE22_DIFFUSERS_SIGNATURE in sd:
        return vae22_keys(*_vae22_layout(sd, official=False)).apply(sd, to_left=True)
    return vae_keys(*_decoder_layout(sd, official=False)).apply(sd, to_left=True)


def vae_from_official(sd: Mapping[str, V]) -> dict[str, V]:
    """diffusers keys for an official Wan 2.1 or 2.2 VAE state dict; same values."""
    if VAE22_OFFICIAL_SIGNATURE in sd:
        return vae22_keys(*_vae22_layout(sd, official=True)).apply(sd)
    return vae_keys(*_decoder_layout(sd, official=True)).apply(sd)

# ---- config.json ----------------------------------------------------------------------------

VAE_CLASSES = ("AutoencoderKLWan",)
TEMPORAL_FACTOR = 4  # frames per latent frame after the first, for both VAEs


def vae_config(config: VAEConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` (with ``_class_name``) of a Wan 2.1 VAE or, for a
    :class:`VAE22Config`, of the Wan 2.2 VAE (``is_residual``, ``patch_size`` 2, 12 channels in
    and out of the convs, ``decoder_base_dim``, 16x spatial compression)."""
    if config.attn_scales:
        raise ValueError(f"attn_scales {config.attn_scales}: diffusers' AutoencoderKLWan has no decoder attention")
    out: dict[str, Any] = {
        "_class_name": VAE_CLASSES[0],
        "base_dim": config.dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(config.temperal_downsample),
        "dropout": config.dropout,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
    }
    if isinstance(config, VAE22Config):
        channels = 3 * PATCH * PATCH
        out.update(is_residual=True, decoder_base_dim=config.dec_dim, patch_size=PATCH, in_channels=channels,
                   out_channels=channels, scale_factor_spatial=config.spatial_factor,
                   scale_factor_temporal=TEMPORAL_FACTOR)
    return out


def check_vae_config(config_json: Mapping[str, Any], network: str) -> None:
    """``ValueError`` when a diffusers ``AutoencoderKLWan`` config describes the other Wan VAE than
    the weights (``network`` "vae": Wan 2.1, "vae22": Wan 2.2), naming the keys that tell."""
    residual = bool(config_json.get("is_residual"))
    if network == "vae":
        unsupported = {k: config_json[k] for k in ("is_residual", "patch_size") if config_json.get(k)}
        if config_json.get("decoder_base_dim") not in (None, config_json.get("base_dim")):
            unsupported["decoder_base_dim"] = config_json["decoder_base_dim"]
        unsupported |= {k: config_json[k] for k in ("in_channels", "out_channels") if config_json.get(k, 3) != 3}
        if unsupported:
            raise ValueError(f"AutoencoderKLWan with {unsupported} describes the Wan 2.2 VAE, but the weights "
                             "are the Wan 2.1 VAE's")
        return
    if not residual:
        raise ValueError(f"\"is_residual\" is {str(config_json.get('is_residual', False)).lower()}: this "
                         "AutoencoderKLWan config describes the Wan 2.1 VAE, but the weights are the Wan 2.2 "
                         "VAE's (expected \"is_residual\": true)")
    channels = 3 * PATCH * PATCH
    wrong = {k: config_json.get(k) for k, want in (("patch_size", PATCH), ("in_channels", channels),
                                                   ("out_channels", channels)) if config_json.get(k) != want}
    if wrong:
        raise ValueError(f"AutoencoderKLWan with {wrong}: the Wan 2.2 VAE has patch_size {PATCH} and "
                         f"{channels} in/out channels")
