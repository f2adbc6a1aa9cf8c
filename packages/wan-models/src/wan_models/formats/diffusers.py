"""diffusers' layouts of the Wan 2.1 DiT and VAE, to and from the official keys.

The ``*-Diffusers`` repositories hold the same weights as the released files under the names of
``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` (``transformer/``) and
``AutoencoderKLWan`` (``vae/``). Converting is renaming only: every tensor keeps its shape
(``scale_shift_table`` is ``[1, 6, dim]`` like ``modulation``; VAE ``gamma`` shapes match too) and
no projection is fused or split, so the converted dict holds the very same tensor objects.

Two points need care. diffusers calls the cross-attention LayerNorm ``norm2`` where the release
says ``norm3`` (the release's ``norm2``, before the FFN, has no parameters). And diffusers groups
the VAE decoder's flat ``upsamples.N`` list into ``up_blocks.L.resnets.J`` / ``upsamplers.0``,
which depends on the residual blocks per level; that count is read from the keys.

diffusers has no place for the Fun V1.1 reference conv, the Control-Camera adapter, the speed
motion controller or VAE decoder attention; such keys raise ``ValueError`` naming them. This
module never imports diffusers.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Mapping, TypeVar

from ..dit_config import CLIP_TOKENS_PER_IMAGE, DiTConfig
from ..vae import VAEConfig
from .keymap import KeyMap

logger = logging.getLogger(__name__)

V = TypeVar("V")

# ---- DiT ------------------------------------------------------------------------------------

# Inside ``blocks.{n}.`` and ``vace_blocks.{n}.``: (official, diffusers).
_BLOCK_RULES = (
    ("self_attn.q.{p}", "attn1.to_q.{p}"),
    ("self_attn.k.{p}", "attn1.to_k.{p}"),
    ("self_attn.v.{p}", "attn1.to_v.{p}"),
    ("self_attn.o.{p}", "attn1.to_out.0.{p}"),
    ("self_attn.norm_q.weight", "attn1.norm_q.weight"),
    ("self_attn.norm_k.weight", "attn1.norm_k.weight"),
    ("cross_attn.q.{p}", "attn2.to_q.{p}"),
    ("cross_attn.k.{p}", "attn2.to_k.{p}"),
    ("cross_attn.v.{p}", "attn2.to_v.{p}"),
    ("cross_attn.o.{p}", "attn2.to_out.0.{p}"),
    ("cross_attn.norm_q.weight", "attn2.norm_q.weight"),
    ("cross_attn.norm_k.weight", "attn2.norm_k.weight"),
    ("cross_attn.k_img.{p}", "attn2.add_k_proj.{p}"),        # CLIP image branch (I2V, FLF2V)
    ("cross_attn.v_img.{p}", "attn2.add_v_proj.{p}"),
    ("cross_attn.norm_k_img.weight", "attn2.norm_added_k.weight"),
    ("norm3.{p}", "norm2.{p}"),                              # the cross-attention LayerNorm
    ("ffn.0.{p}", "ffn.net.0.proj.{p}"),
    ("ffn.2.{p}", "ffn.net.2.{p}"),
    ("modulation", "scale_shift_table"),
    ("before_proj.{p}", "proj_in.{p}"),                      # first VACE block only
    ("after_proj.{p}", "proj_out.{p}"),                      # VACE blocks
)

_DIT_RULES = (
    ("patch_embedding.{p}", "patch_embedding.{p}"),
    ("vace_patch_embedding.{p}", "vace_patch_embedding.{p}"),
    ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("img_emb.proj.0.{p}", "condition_embedder.image_embedder.norm1.{p}"),
    ("img_emb.proj.1.{p}", "condition_embedder.image_embedder.ff.net.0.proj.{p}"),
    ("img_emb.proj.3.{p}", "condition_embedder.image_embedder.ff.net.2.{p}"),
    ("img_emb.proj.4.{p}", "condition_embedder.image_embedder.norm2.{p}"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),  # FLF2V
    ("head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "scale_shift_table"),
    *((f"{stack}.{{n}}.{official}", f"{stack}.{{n}}.{theirs}")
      for stack in ("blocks", "vace_blocks") for official, theirs in _BLOCK_RULES),
)

DIT_KEYS = KeyMap(_DIT_RULES, "official", "diffusers")

# Keys some diffusers files carry that diffusers itself skips on load (``_keys_to_ignore_on_load_unexpected``).
_IGNORED_DIT_KEYS = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")

# ---- VAE ------------------------------------------------------------------------------------

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

# Where each layer sits: (official, diffusers, its parts). The encoder's flat layer list keeps its
# numbering in diffusers; the decoder's is regrouped by level (see _decoder_places).
_VAE_PLACES = (
    ("conv1", "quant_conv", _CONV),
    ("conv2", "post_quant_conv", _CONV),
    ("{coder}.conv1", "{coder}.conv_in", _CONV),
    ("{coder}.middle.0", "{coder}.mid_block.resnets.0", _RESIDUAL),
    ("{coder}.middle.1", "{coder}.mid_block.attentions.0", _ATTENTION),
    ("{coder}.middle.2", "{coder}.mid_block.resnets.1", _RESIDUAL),
    ("{coder}.head.0", "{coder}.norm_out", _NORM),
    ("{coder}.head.2", "{coder}.conv_out", _CONV),
    ("encoder.downsamples.{n}", "encoder.down_blocks.{n}", _RESIDUAL + _ATTENTION + _RESAMPLE),
)

_OFFICIAL_DECODER_LAYER = re.compile(r"decoder\.upsamples\.(\d+)\..+")
_DIFFUSERS_DECODER_LAYER = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\..+")


def _decoder_places(levels: int, blocks_per_level: int) -> list[tuple[str, str, tuple]]:
    """Each decoder level is ``blocks_per_level`` residual blocks and then one upsampler (none after
    the last level): official ``upsamples.N`` is slot ``N % (blocks_per_level + 1)`` of level
    ``N // (blocks_per_level + 1)``. diffusers has no attention in these levels."""
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
    """``(levels, residual blocks per level)`` of a VAE decoder, read from its keys."""
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
    """The official <-> diffusers key map of a Wan VAE whose decoder has this layout."""
    places = (*_VAE_PLACES, *_decoder_places(levels, blocks_per_level))
    return KeyMap(((f"{official}.{official_part}", f"{theirs}.{their_part}")
                   for official, theirs, parts in places for official_part, their_part in parts),
                  "official", "diffusers")

# ---- state dicts ----------------------------------------------------------------------------

DIT_SIGNATURES = ("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight")
VAE_SIGNATURES = ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight")
_OFFICIAL_DIT = ("blocks.0.self_attn.q.weight",)
_OFFICIAL_VAE = ("encoder.conv1.weight", "decoder.conv1.weight")


def _has_any(sd: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    return any(k in sd for k in keys)


def is_diffusers(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` has diffusers' Wan DiT or VAE key names."""
    return _has_any(sd, DIT_SIGNATURES) or _has_any(sd, VAE_SIGNATURES)


def to_official(sd: Mapping[str, V]) -> dict[str, V]:
    """Official keys for a diffusers Wan DiT (incl. VACE) or VAE state dict; same values."""
    if _has_any(sd, DIT_SIGNATURES):
        ignored = {k for k in sd if _IGNORED_DIT_KEYS.fullmatch(k)}
        if ignored:
            logger.info("dropping %d unused attn2.norm_added_q keys (diffusers ignores them too)", len(ignored))
        return DIT_KEYS.apply({k: v for k, v in sd.items() if k not in ignored}, to_left=True)
    if _has_any(sd, VAE_SIGNATURES):
        return vae_keys(*_decoder_layout(sd, official=False)).apply(sd, to_left=True)
    raise ValueError(f"not a diffusers Wan DiT or VAE state dict: none of {DIT_SIGNATURES + VAE_SIGNATURES}")


def from_official(sd: Mapping[str, V]) -> dict[str, V]:
    """diffusers keys for an official Wan DiT or VAE state dict; same values."""
    if _has_any(sd, _OFFICIAL_DIT):
        return DIT_KEYS.apply(sd)
    if _has_any(sd, _OFFICIAL_VAE):
        return vae_keys(*_decoder_layout(sd, official=True)).apply(sd)
    raise ValueError("diffusers has Wan layouts for the DiT and the VAE only (its text and image "
                     f"encoders are transformers models); this state dict has neither: {sorted(sd)[:5]}")

# ---- config.json ----------------------------------------------------------------------------

TRANSFORMER_CLASSES = ("WanTransformer3DModel", "WanVACETransformer3DModel")
VAE_CLASSES = ("AutoencoderKLWan",)


def is_diffusers_config(config_json: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is a diffusers Wan transformer or VAE config."""
    return config_json.get("_class_name") in TRANSFORMER_CLASSES + VAE_CLASSES


# The config.json key of each config field that config_fields reads.
CONFIG_KEYS = {"num_heads": "num_attention_heads", "eps": "eps", "vace_layers": "vace_layers",
               "latents_mean": "latents_mean", "latents_std": "latents_std"}


def positive_int(value: Any) -> int:
    """``value`` if it is a positive JSON integer; ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _numbers(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list")
    return tuple(_number(v) for v in value)


def _layers(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise ValueError(f"{value!r} is not a list of layer indices")
    return tuple(value)


_CONVERTERS = {"num_heads": (positive_int, "a positive integer"), "eps": (_number, "a number"),
               "vace_layers": (_layers, "a list of layer indices"), "latents_mean": (_numbers, "a list of numbers"),
               "latents_std": (_numbers, "a list of numbers")}


def _read_field(config_json: Mapping[str, Any], field: str) -> Any:
    convert, expected = _CONVERTERS[field]
    value = config_json[CONFIG_KEYS[field]]
    try:
        return convert(value)
    except ValueError:
        raise ValueError(f"\"{CONFIG_KEYS[field]}\" must be {expected}, got {json.dumps(value)}") from None


def config_fields(config_json: Mapping[str, Any], network: str) -> dict[str, Any]:
    """The :class:`DiTConfig` (``network="dit"``) or :class:`VAEConfig` (``"vae"``) fields that a
    diffusers ``config.json`` states and the weights cannot show: the DiT's heads, eps and VACE
    layer placement, the VAE's latent statistics. A value of the wrong type raises ``ValueError``
    naming its key (see :data:`CONFIG_KEYS`)."""
    name = config_json.get("_class_name")
    expected = {"dit": TRANSFORMER_CLASSES, "vae": VAE_CLASSES}.get(network, ())
    if name not in expected:
        raise ValueError(f"a diffusers {name!r} config.json does not describe a {network} checkpoint")
    if network == "dit":
        return {f: _read_field(config_json, f) for f in ("num_heads", "eps", "vace_layers")
                if CONFIG_KEYS[f] in config_json}
    unsupported = {k: config_json[k] for k in ("is_residual", "patch_size") if config_json.get(k)}
    if config_json.get("decoder_base_dim") not in (None, config_json.get("base_dim")):
        unsupported["decoder_base_dim"] = config_json["decoder_base_dim"]
    unsupported |= {k: config_json[k] for k in ("in_channels", "out_channels") if config_json.get(k, 3) != 3}
    if unsupported:
        raise ValueError(f"AutoencoderKLWan with {unsupported} is not the Wan 2.1 VAE (Wan 2.2?)")
    return {f: _read_field(config_json, f) for f in ("latents_mean", "latents_std") if CONFIG_KEYS[f] in config_json}


def transformer_config(config: DiTConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` (with ``_class_name``) of a DiT; raises for parts diffusers lacks."""
    lacking = [name for name, present in (("ref_conv (Fun V1.1)", config.ref_conv),
                                          ("camera adapter (Fun Control-Camera)", config.camera_in_dim is not None),
                                          ("qk_norm=False", not config.qk_norm)) if present]
    if lacking:
        raise ValueError(f"diffusers' Wan transformers have no {', '.join(lacking)}")
    out: dict[str, Any] = {
        "_class_name": TRANSFORMER_CLASSES[1] if config.vace_layers else TRANSFORMER_CLASSES[0],
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.eps,
        "image_dim": config.clip_dim if config.image_input else None,
        "added_kv_proj_dim": config.dim if config.image_input else None,
        "pos_embed_seq_len": 2 * CLIP_TOKENS_PER_IMAGE if config.image_pos_emb else None,
    }
    if config.vace_layers:
        out.update(vace_layers=list(config.vace_layers), vace_in_channels=config.vace_in_dim)
    return out


def vae_config(config: VAEConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` (with ``_class_name``) of a Wan VAE."""
    if config.attn_scales:
        raise ValueError(f"attn_scales {config.attn_scales}: diffusers' AutoencoderKLWan has no decoder attention")
    return {
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
