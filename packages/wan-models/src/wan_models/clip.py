"""CLIP ViT-H/14 vision tower as Wan 2.1 uses it for image conditioning.

The released file (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``) holds the whole
open-clip XLM-RoBERTa CLIP; only its ``visual.*`` subtree is this module. :func:`visual_state_dict`
turns the released file into this module's state dict (prefix removed, text tower dropped). The
module keeps every visual tensor, including the last block, ``post_norm`` and ``head``, which Wan
never runs: strict loading then checks the whole released subtree, and the state dict maps back
to the release one to one.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

logger = logging.getLogger(__name__)

__all__ = ["CLIPVisionConfig", "CLIPVisionTower", "config_from_state_dict", "visual_state_dict"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Constructor kwargs of the official XLMRobertaCLIP that only concern the text tower.
_TEXT_KWARGS = frozenset({"vocab_size", "max_text_len", "type_size", "pad_id", "text_dim", "text_heads",
                          "text_layers", "text_post_norm", "text_dropout"})


@dataclass
class CLIPVisionConfig:
    """Vision-tower hyper-parameters under the official ``XLMRobertaCLIP`` names; defaults = ViT-H/14."""

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_dim: int = 1280
    vision_mlp_ratio: float = 4
    vision_heads: int = 16
    vision_layers: int = 32
    vision_pool: str = "token"
    vision_pre_norm: bool = True
    vision_post_norm: bool = False
    activation: str = "gelu"
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    embedding_dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # Only the released variant is implemented; other open-clip options change the keys or maths.
        released = {"vision_pool": "token", "vision_pre_norm": True, "vision_post_norm": False,
                    "activation": "gelu"}
        other = {k: getattr(self, k) for k, v in released.items() if getattr(self, k) != v}
        if other:
            raise ValueError(f"unsupported CLIP vision options {other}; only {released} is implemented")
        if self.attn_dropout:
            # The attention hook takes no dropout argument.
            raise ValueError(f"attn_dropout={self.attn_dropout} is not supported (released: 0.0)")
        if self.vision_dim % self.vision_heads:
            raise ValueError(f"vision_dim {self.vision_dim} is not divisible by "
                             f"vision_heads {self.vision_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.vision_layers < 2:
            raise ValueError("Wan uses all blocks but the last, so vision_layers must be >= 2, "
                             f"got {self.vision_layers}")

    @classmethod
    def from_official(cls, kwargs: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From the full ``XLMRobertaCLIP`` kwargs: text-tower names are ignored, unknown ones rejected."""
        own = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - own - _TEXT_KWARGS)
        if unknown:
            raise ValueError(f"unknown CLIP config names {unknown}")
        return cls(**{k: v for k, v in kwargs.items() if k in own})

    @property
    def mlp_dim(self) -> int:
        return int(self.vision_dim * self.vision_mlp_ratio)

    @property
    def num_tokens(self) -> int:
        """Class token plus one token per patch (257 for the release)."""
        return (self.image_size // self.patch_size) ** 2 + 1


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype, as the reference does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float()
        bias = self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``to_qkv`` projection, through the shared hook."""

    def __init__(self, dim: int, num_heads: int, proj_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, -1).unbind(2)
        return self.dropout(self.proj(attention(q, k, v).reshape(b, s, c)))


class AttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (GELU erf)."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.vision_dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.vision_dim, cfg.vision_heads, cfg.proj_dropout)
        self.norm2 = LayerNorm(cfg.vision_dim, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.vision_dim, cfg.mlp_dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_dim, cfg.vision_dim), nn.Dropout(cfg.proj_dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTower(nn.Module):
    """The ``visual`` part of the released CLIP; :meth:`forward` returns what Wan feeds the DiT."""

    dtype_parameters: tuple[str, ...] = ("patch_embedding.weight",)  # forward casts to it; see wan_models.ops

    def __init__(self, config: CLIPVisionConfig | None = None) -> None:
        super().__init__()
        self.config = config or CLIPVisionConfig()
        cfg = self.config
        dim = cfg.vision_dim
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.num_tokens, dim))
        self.dropout = nn.Dropout(cfg.embedding_dropout)
        self.pre_norm = LayerNorm(dim, eps=cfg.norm_eps)
        self.transformer = nn.Sequential(*(AttentionBlock(cfg) for _ in range(cfg.vision_layers)))
        # Kept for strict loading of the released subtree; Wan's features stop before them.
        self.post_norm = LayerNorm(dim, eps=cfg.norm_eps)
        self.head = nn.Parameter(torch.empty(dim, cfg.embed_dim))
        self._init_free_tensors()

    def _init_free_tensors(self) -> None:
        """Random init of the raw parameters (skipped on ``meta``), so an unloaded tower is usable."""
        if self.head.is_meta:
            return
        gain = self.config.vision_dim ** -0.5
        with torch.no_grad():
            for p in (self.cls_embedding, self.pos_embedding, self.head):
                p.normal_(std=gain)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [-1, 1] to normalised ``[B, 3, S, S]`` pixel values (S = image_size).

        Bicubic resize (``align_corners=False``, no antialias) before mapping to [0, 1], as Wan does.
        """
        if images.ndim != 4 or images.size(1) != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        size = (self.config.image_size,) * 2
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return x.mul_(0.5).add_(0.5).sub_(mean).div_(std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features ``[B, num_tokens, vision_dim]`` after all blocks but the last, without final norm."""
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be [B, 3, {s}, {s}], got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.size(0), -1, -1), x], dim=1)
        x = self.pre_norm(self.dropout(x + self.pos_embedding))
        return self.transformer[:-1](x)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`preprocess` then :meth:`forward`: [-1, 1] images to Wan's CLIP features."""
        return self.forward(self.preprocess(images))


def visual_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's state dict from the released whole-CLIP file: ``visual.*`` without the prefix.

    ``textual.*`` and ``log_scale`` are dropped. A dict without any ``visual.`` key is taken to be a
    tower state dict already and returned as a plain copy of the mapping (tensors are not copied).
    Any other key next to ``visual.*`` raises ``ValueError``.
    """
    if not any(k.startswith("visual.") for k in sd):
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    dropped, unknown = 0, []
    for key, value in sd.items():
        if key.startswith("visual."):
            out[key[len("visual."):]] = value
        elif key.startswith("textual.") or key == "log_scale":
            dropped += 1
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised keys in a CLIP state dict: {sorted(unknown)[:8]}")
    logger.debug("CLIP: kept %d visual tensors, dropped %d text-tower/log_scale tensors", len(out), dropped)
    return out


_BLOCK_KEY = re.compile(r"transformer\.(\d+)\.(.+)")
_BLOCK_PARAMS = tuple(f"{m}.{p}" for m in ("norm1", "attn.to_qkv", "attn.proj", "norm2", "mlp.0", "mlp.2")
                      for p in ("weight", "bias"))
_TOWER_KEYS = ("patch_embedding.weight", "cls_embedding", "pos_embedding", "pre_norm.weight", "pre_norm.bias",
               "post_norm.weight", "post_norm.bias", "head")
RELEASED_HEADS = {1280: 16}  # vision_dim -> heads of the released ViT-H/14 (head dim 80)


def config_from_state_dict(sd: Mapping[str, torch.Tensor],
                           vision_heads: int | None = None) -> CLIPVisionConfig:
    """Vision config from the key names and shapes of a released CLIP file or a tower state dict.

    The head count is not stored in the weights: pass ``vision_heads`` unless the width is the
    released 1280 (16 heads). Raises ``ValueError`` naming missing or unrecognised keys.
    """
    sd = visual_state_dict(sd)
    missing = [k for k in _TOWER_KEYS if k not in sd]
    if missing:
        raise ValueError(f"not a CLIP vision state dict: missing {missing}")
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.fullmatch(k))}
    if not layers:
        raise ValueError("not a CLIP vision state dict: no transformer.N.* blocks")
    dim, _, patch, _ = sd["patch_embedding.weight"].shape
    grid = math.isqrt(sd["pos_embedding"].shape[1] - 1)
    if grid * grid + 1 != sd["pos_embedding"].shape[1]:
        raise ValueError(f"pos_embedding {tuple(sd['pos_embedding'].shape)} is not "
                         "1 + a square number of patches")
    heads = vision_heads or RELEASED_HEADS.get(dim)
    if heads is None:
        raise ValueError(f"the head count of a {dim}-wide tower is not stored in the weights; "
                         "pass vision_heads")
    mlp_dim = sd["transformer.0.mlp.0.weight"].shape[0]
    ratio = mlp_dim // dim if mlp_dim % dim == 0 else mlp_dim / dim
    cfg = CLIPVisionConfig(embed_dim=sd["head"].shape[1], image_size=grid * patch, patch_size=patch,
                           vision_dim=dim, vision_mlp_ratio=ratio, vision_heads=heads,
                           vision_layers=max(layers) + 1)
    expected = set(_TOWER_KEYS)
    expected.update(f"transformer.{i}.{p}" for i in range(cfg.vision_layers) for p in _BLOCK_PARAMS)
    unknown, absent = sorted(set(sd) - expected), sorted(expected - set(sd))
    if unknown or absent:
        raise ValueError(f"CLIP vision state dict not recognised: unexpected keys {unknown[:8]}, "
                         f"missing keys {absent[:8]}")
    logger.debug("CLIP vision config from state dict: %s", cfg)
    return cfg
