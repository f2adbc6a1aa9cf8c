"""umT5-XXL text encoder as Wan 2.1 runs it, loading ``models_t5_umt5-xxl-enc-bf16.pth`` unchanged.

The architecture follows the released encoder: unscaled token embedding, pre-norm blocks with an
RMS ("T5") LayerNorm, self-attention without ``1/sqrt(d)`` scaling plus a relative-position bias
that every block owns, and a gated-GELU(tanh) feed-forward. Position buckets are computed on the fly
(no buffers), so the module can be built on the ``meta`` device and loaded with ``assign=True``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["T5Config", "T5Context", "UMT5Encoder", "config_from_state_dict"]

# Relative distances beyond this share the last log-spaced bucket (fixed in the released model).
MAX_DISTANCE = 128


@dataclass
class T5Config:
    """Encoder hyper-parameters under the official ``T5Encoder`` kwarg names; defaults = umT5-XXL."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.shared_pos:
            raise ValueError("shared_pos=True (one position table for all blocks) is not umT5; "
                             "the released encoder has a table per block (shared_pos=False)")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a positive multiple of 4, got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


class T5Context(NamedTuple):
    """What the DiT receives: ``context [B, L, dim]`` zero past each prompt, and ``seq_lens [B]``."""

    context: torch.Tensor
    seq_lens: torch.Tensor


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Pull infinities back into range in float16, as the reference does after every residual."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


def relative_position_buckets(length: int, num_buckets: int, device: torch.device) -> torch.Tensor:
    """Bidirectional T5 buckets ``[L, L]`` for key minus query offsets.

    Half the buckets per sign; distances below a quarter of ``num_buckets`` get their own bucket,
    larger ones are log-spaced up to :data:`MAX_DISTANCE` and clamped. The float expression keeps the
    reference's operation order because truncation at bucket edges depends on it.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    # Distances below `exact` are used as they are; clamping keeps log() finite for them.
    far = exact + (torch.log(dist.clamp(min=exact).float() / exact)
                   / math.log(MAX_DISTANCE / exact) * (half - exact)).long()
    return buckets + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """RMS normalisation without mean or bias, computed in float32 (scale applied in weight dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head self-attention with an additive bias and no query scaling (T5 convention)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor,
                mask_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, h = x.size(0), x.size(1), self.num_heads
        q, k, v = (proj(x).view(b, n, h, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # Explicit matmuls rather than SDPA: the reference adds the bias to unscaled logits in the
        # activation dtype and takes the softmax in float32; this reproduces it in every dtype.
        # Adding the (0 / most-negative) mask after the position bias equals the reference's
        # masked_fill, since a bounded bias vanishes next to finfo.min.
        scores = (q @ k.transpose(-1, -2)).add_(pos_bias)
        if mask_bias is not None:
            scores.add_(mask_bias)
        attn = F.softmax(scores.float(), dim=-1).to(scores.dtype)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.dropout(self.o(out))


class GELUTanh(nn.Module):
    """Tanh-approximated GELU written out as the reference does ("gelu_new").

    ``F.gelu(approximate="tanh")`` is the same function but rounds differently (by an ulp in
    float32, more in bfloat16, where every step of this expression is rounded).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5FeedForward(nn.Module):
    """Gated feed-forward ``fc2(fc1(x) * gelu_tanh(gate(x)))``."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.fc1(x) * self.gate(x))))


class T5RelativeEmbedding(nn.Module):
    """Per-block table of learned biases, one per (bucket, head); key name ``pos_embedding.embedding``."""

    children_read_directly: tuple[str, ...] = ("embedding",)  # its weight's device; see wan_models.ops

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """Bias ``[1, H, L, L]`` for a sequence of ``length`` tokens."""
        buckets = relative_position_buckets(length, self.num_buckets, self.embedding.weight.device)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    """Pre-norm encoder block: attention then gated FFN, each with a residual connection."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim)
        self.attn = T5Attention(cfg)
        self.norm2 = T5LayerNorm(cfg.dim)
        self.ffn = T5FeedForward(cfg)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        pos_bias = self.pos_embedding(x.size(1))
        x = _clamp_fp16(x + self.attn(self.norm1(x), pos_bias, mask_bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack; state-dict keys are those of the released checkpoint."""

    def __init__(self, config: T5Config | None = None) -> None:
        super().__init__()
        self.config = config or T5Config()
        cfg = self.config
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim)

    def _check_inputs(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor [B, L], got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab}), "
                             f"got range [{int(ids.min())}, {int(ids.max())}]")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match ids shape {tuple(ids.shape)}")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, dim]`` for token ``ids [B, L]``; ``mask`` (1 = token) hides padded keys.

        Rows at padded positions are computed too (they are not zero); see :meth:`encode_context`.
        """
        self._check_inputs(ids, mask)
        x = self.dropout(self.token_embedding(ids))
        mask_bias = None
        if mask is not None:
            mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            mask_bias = mask_bias.masked_fill_(mask.eq(0), torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask_bias)
        return self.dropout(self.norm(x))

    def encode_context(self, ids: torch.Tensor, mask: torch.Tensor) -> T5Context:
        """Wan's text context: encoder output with rows past each prompt's length set to zero.

        ``seq_lens = mask.gt(0).sum(1)``; the official wrapper cuts each prompt to its first
        ``seq_lens`` rows and the DiT pads them back with zeros, which is what this returns.
        """
        seq_lens = mask.gt(0).sum(dim=1)
        out = self.forward(ids, mask)
        keep = torch.arange(ids.size(1), device=out.device)[None, :] < seq_lens[:, None]
        return T5Context(out.masked_fill_(~keep[..., None], 0), seq_lens)


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_PARAMS = ("norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                 "pos_embedding.embedding.weight")


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> T5Config:
    """Encoder config read from a released-layout state dict's key names and shapes.

    Raises ``ValueError`` naming missing or unrecognised keys (e.g. a shared position table or a
    full encoder-decoder file), so a wrong file fails before any weights are touched.
    """
    required = ("token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight",
                "blocks.0.ffn.fc1.weight", "blocks.0.pos_embedding.embedding.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not a umT5 encoder state dict: missing {missing}")
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.fullmatch(k))}
    vocab, dim = sd["token_embedding.weight"].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    cfg = T5Config(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                   dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=num_heads,
                   num_layers=max(layers) + 1, num_buckets=num_buckets)
    expected = {"token_embedding.weight", "norm.weight"}
    expected.update(f"blocks.{i}.{p}" for i in range(cfg.num_layers) for p in _BLOCK_PARAMS)
    unknown, absent = sorted(set(sd) - expected), sorted(expected - set(sd))
    if unknown or absent:
        raise ValueError(f"umT5 encoder state dict not recognised: unexpected keys {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}, missing keys {absent[:8]}"
                         f"{' ...' if len(absent) > 8 else ''}")
    logger.debug("umT5 encoder config from state dict: %s", cfg)
    return cfg
