"""diffusers' layouts of the Wan 2.1 / 2.2 DiTs and VAEs, to and from the official keys.

The ``*-Diffusers`` repositories hold the same weights as the released files under the names of
``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` (``transformer/``, and ``transformer_2/``
for the low-noise expert of Wan2.2-A14B) and ``AutoencoderKLWan`` (``vae/``). Converting is
renaming only: every tensor keeps its shape (``scale_shift_table`` is ``[1, 6, dim]`` like
``modulation``; VAE ``gamma`` shapes match too) and no projection is fused or split, so the
converted dict holds the very same tensor objects. Wan 2.2 DiTs use the Wan 2.1 names (they only
lack the CLIP branch); the VAE layouts are in :mod:`.diffusers_vae`.

diffusers calls the cross-attention LayerNorm ``norm2`` where the release says ``norm3`` (the
release's ``norm2``, before the FFN, has no parameters).

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
# The VAE names are re-exported: callers use diffusers.vae_config, diffusers.vae_keys, ...
from .diffusers_vae import (VAE_CLASSES, VAE_SIGNATURES, check_vae_config, is_diffusers_vae, is_official_vae,
                            vae22_keys, vae_config, vae_from_official, vae_keys, vae_to_official)
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

# ---- state dicts ----------------------------------------------------------------------------

DIT_SIGNATURES = ("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight")
_OFFICIAL_DIT = ("blocks.0.self_attn.q.weight",)


def _has_any(sd: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    return any(k in sd for k in keys)


def is_diffusers(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` has diffusers' Wan DiT or VAE key names."""
    return _has_any(sd, DIT_SIGNATURES) or is_diffusers_vae(sd)


def to_official(sd: Mapping[str, V]) -> dict[str, V]:
    """Official keys for a diffusers Wan DiT (incl. VACE) or VAE state dict; same values."""
    if _has_any(sd, DIT_SIGNATURES):
        ignored = {k for k in sd if _IGNORED_DIT_KEYS.fullmatch(k)}
        if ignored:
            logger.info("dropping %d unused attn2.norm_added_q keys (diffusers ignores them too)", len(ignored))
        return DIT_KEYS.apply({k: v for k, v in sd.items() if k not in ignored}, to_left=True)
    if is_diffusers_vae(sd):
        return vae_to_official(sd)
    raise ValueError(f"not a diffusers Wan DiT or VAE state dict: none of {DIT_SIGNATURES + VAE_SIGNATURES}")


def from_official(sd: Mapping[str, V]) -> dict[str, V]:
    """diffusers keys for an official Wan DiT or VAE state dict; same values."""
    if _has_any(sd, _OFFICIAL_DIT):
        return DIT_KEYS.apply(sd)
    if is_official_vae(sd):
        return vae_from_official(sd)
    raise ValueError("diffusers has Wan layouts for the DiT and the VAE only (its text and image "
                     f"encoders are transformers models); this state dict has neither: {sorted(sd)[:5]}")

# ---- config.json ----------------------------------------------------------------------------

TRANSFORMER_CLASSES = ("WanTransformer3DModel", "WanVACETransformer3DModel")


def is_diffusers_config(config_json: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is a diffusers Wan transformer or VAE config."""
    return config_json.get("_class_name") in TRANSFORMER_CLASSES + VAE_CLASSES


# The config.json key of each config field that config_fields reads.
CONFIG_KEYS = {"num_heads": "num_attention_heads", "eps": "eps", "vace_layers": "vace_layers",
               "latents_mean": "latents_mean", "latents_std": "latents_std", "family": "in_channels"}
# Channels no Wan 2.1 DiT without a CLIP branch has: TI2V-5B's 48 out, the I2V-A14B expert's 36 in
# (the same rule as dit_config_from_state_dict's; a Wan 2.2 T2V expert cannot be told from Wan 2.1).
WAN22_OUT_CHANNELS, WAN22_IN_CHANNELS = 48, 36


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


def _family(config_json: Mapping[str, Any]) -> str | None:
    """"wan2.2" when a transformer config.json can tell (see :data:`WAN22_OUT_CHANNELS`), else None."""
    if config_json.get("image_dim") is not None or config_json.get("vace_layers"):
        return None
    wan22 = (config_json.get("out_channels") == WAN22_OUT_CHANNELS
             or config_json.get("in_channels") == WAN22_IN_CHANNELS)
    return "wan2.2" if wan22 and "in_channels" in config_json else None


def _read_field(config_json: Mapping[str, Any], field: str) -> Any:
    convert, expected = _CONVERTERS[field]
    value = config_json[CONFIG_KEYS[field]]
    try:
        return convert(value)
    except ValueError:
        raise ValueError(f"\"{CONFIG_KEYS[field]}\" must be {expected}, got {json.dumps(value)}") from None


def config_fields(config_json: Mapping[str, Any], network: str) -> dict[str, Any]:
    """The :class:`DiTConfig` (``network="dit"``), :class:`VAEConfig` (``"vae"``) or
    :class:`VAE22Config` (``"vae22"``) fields that a diffusers ``config.json`` states and the
    weights cannot show: the DiT's heads, eps, VACE layer placement and (where its channels tell)
    family "wan2.2"; the VAE's latent statistics. A value of the wrong type raises ``ValueError``
    naming its key (see :data:`CONFIG_KEYS`), and so does a VAE config of the other Wan VAE
    (``is_residual`` against the weights)."""
    name = config_json.get("_class_name")
    expected = {"dit": TRANSFORMER_CLASSES, "vae": VAE_CLASSES, "vae22": VAE_CLASSES}.get(network, ())
    if name not in expected:
        raise ValueError(f"a diffusers {name!r} config.json does not describe a {network} checkpoint")
    if network == "dit":
        out = {f: _read_field(config_json, f) for f in ("num_heads", "eps", "vace_layers")
               if CONFIG_KEYS[f] in config_json}
        family = _family(config_json)
        return out | ({"family": family} if family else {})
    check_vae_config(config_json, network)
    return {f: _read_field(config_json, f) for f in ("latents_mean", "latents_std") if CONFIG_KEYS[f] in config_json}


def transformer_config(config: DiTConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` (with ``_class_name``) of a Wan 2.1 or 2.2 DiT; raises for parts
    diffusers lacks. A Wan 2.2 DiT has no CLIP branch, so ``image_dim`` and ``added_kv_proj_dim``
    are null whatever its channels (48 for TI2V-5B, 36 for the I2V-A14B experts)."""
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
