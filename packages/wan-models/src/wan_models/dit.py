"""The Wan 2.1 / 2.2 diffusion transformer (T2V, I2V, FLF2V, Fun, VACE, TI2V), keyed as the released files.

Tokens: ``patch_embedding`` turns latents ``[B, C, F, H, W]`` into ``F*H*W/4`` tokens. Each block
applies time-modulated self-attention with 3D RoPE, cross-attention to the text (and CLIP image)
context and a time-modulated FFN. Timesteps are ``[B]`` (one per video) or ``[B, L]`` (one per
token, Wan 2.2: per-token modulation). The residual stream and all modulation arithmetic stay in
float32, as in the reference; linear layers run in the weights' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .attention import AttentionFn, attention
from .dit_config import DiTConfig
from .dit_extras import CameraAdapter
from .rope import rope_tables

if TYPE_CHECKING:  # the loader sets WanDiT.identity; importing identity here would pull in the registry
    from .identity import Identity


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Cos-then-sin embedding of ``positions [N]`` over ``dim/2`` frequencies, in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = torch.outer(positions.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def is_per_token(timestep: torch.Tensor) -> bool:
    """Whether ``timestep`` holds one value per token (``[B, L]``, L > 1) rather than per video."""
    return timestep.ndim == 2 and timestep.shape[1] > 1


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (the q/k norm of every attention)."""

    op_overrides: Mapping[str, Callable] | None = None  # this model's own ops (WanDiT.set_ops)

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.get_op("rms_norm", self.op_overrides)(x, self.weight, self.eps)


def layer_norm32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm in float32 whatever the dtypes of ``x`` and the norm's affine parameters."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


# Rows kept before the folded padding are rounded up to a multiple of this, so that prompts of
# similar length give the same shapes (one graph for compiled blocks); zero rows kept are ordinary rows.
CONTEXT_ROWS_MULTIPLE = 64


class Context(NamedTuple):
    """The embedded context (CLIP image tokens first) and the additive key bias of the text attention.

    ``bias`` is ``None`` (plain attention) or ``[L_ctx]`` zeros ending in ``log(count)``: the last
    row then stands for ``count`` trailing zero-padding rows (see :func:`fold_padding`).
    """

    rows: torch.Tensor                            # [B, L_ctx, dim]
    bias: torch.Tensor | None


def fold_padding(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the trailing rows that are zero in every batch item into one zero row; returns it with its bias.

    The zero rows all give the same key and value, and softmax attention over ``n`` identical rows
    equals attention over one of them with its logit raised by ``log(n)``. The bias is ``None``
    (context unchanged) when fewer than two rows would fold, and in half precision, where SDPA would
    round ``log(n)`` to the context's dtype (and the saving is small next to GPU self-attention).
    """
    if context.dtype != torch.float32:
        return context, None
    total = context.shape[1]
    used = context.ne(0).any(-1).any(0)
    length = int((used * torch.arange(1, total + 1, device=context.device)).max())
    keep = min(-(-length // CONTEXT_ROWS_MULTIPLE) * CONTEXT_ROWS_MULTIPLE, total)
    if total - keep < 2:
        return context, None
    # The mean of the zero rows is zero, and spreads the row's gradient evenly over them, as attending each would.
    folded = torch.cat([context[:, :keep], context[:, keep:].mean(1, keepdim=True)], dim=1)
    bias = torch.zeros(keep + 1, dtype=context.dtype, device=context.device)
    bias[-1] = math.log(total - keep)
    return folded, bias


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     fn: AttentionFn | None = None) -> torch.Tensor:
    """:func:`attention` (with backend ``fn``), or SDPA with ``bias [L_k]`` added to every query's
    logits (the hook takes no bias)."""
    if bias is None:
        return attention(q, k, v, fn)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias.to(q.dtype).unsqueeze(0))
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    attention_fn: AttentionFn | None = None  # this model's own backend (WanDiT.set_attention_backend)
    op_overrides: Mapping[str, Callable] | None = None  # this model's own ops (WanDiT.set_ops)

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        heads, rotate = (self.num_heads, -1), ops.get_op("apply_rope", self.op_overrides)
        q = rotate(self.norm_q(self.q(x)).unflatten(-1, heads), *rope)
        k = rotate(self.norm_k(self.k(x)).unflatten(-1, heads), *rope)
        v = self.v(x).unflatten(-1, heads)
        return self.o(attention(q, k, v, self.attention_fn).flatten(-2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the text context, plus a CLIP image branch on image models.

    The first ``image_tokens`` context rows go to the image branch (``k_img``/``v_img``), the
    others to the text branch with the context's bias; both branches share ``q`` and are summed
    before ``o``.
    """

    attention_fn: AttentionFn | None = None  # this model's own backend (WanDiT.set_attention_backend)

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool = True,
                 image_input: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        if image_input:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: Context, image_tokens: int = 0) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        image, text = context.rows[:, :image_tokens], context.rows[:, image_tokens:]
        bias = None if context.bias is None else context.bias[image_tokens:]
        k = self.norm_k(self.k(text)).unflatten(-1, heads)
        out = biased_attention(q, k, self.v(text).unflatten(-1, heads), bias, self.attention_fn)
        if image_tokens:
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, heads)
            out = out + attention(q, k_img, self.v_img(image).unflatten(-1, heads), self.attention_fn)
        return self.o(out.flatten(-2))


class DiTBlock(nn.Module):
    """Modulated self-attention, cross-attention and modulated FFN with gated residuals."""

    children_read_directly: tuple[str, ...] = ("norm3",)  # layer_norm32(x, self.norm3); see wan_models.ops
    op_overrides: Mapping[str, Callable] | None = None  # this model's own ops (WanDiT.set_ops)

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps, config.qk_norm)
        self.norm3 = nn.LayerNorm(dim, eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, eps, config.qk_norm, config.image_input)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: Context,
                rope: tuple[torch.Tensor, torch.Tensor], image_tokens: int = 0) -> torch.Tensor:
        """``x [B, L, dim]`` float32 residual stream, ``e0 [B, 6, dim]`` or per token ``[B, L, 6, dim]``
        float32 time modulation."""
        # The compute dtype is read from a parameter no kernel package swaps (FP8 linears keep others).
        dtype, eps = self.modulation.dtype, self.norm1.eps
        own = self.op_overrides
        modulate, gated_residual = ops.get_op("modulate", own), ops.get_op("gated_residual", own)
        if e0.ndim == 3:
            shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unbind(2)
        x = gated_residual(x, self.self_attn(modulate(x, shift1, scale1, eps).to(dtype), rope), gate1)
        h = layer_norm32(x, self.norm3) if isinstance(self.norm3, nn.LayerNorm) else x
        x = x + self.cross_attn(h.to(dtype), context, image_tokens)
        return gated_residual(x, self.ffn(modulate(x, shift2, scale2, eps).to(dtype)), gate2)


class VaceBlock(DiTBlock):
    """A DiT block on the VACE hint stream that also emits ``after_proj`` of its output as a hint.

    The first block starts the stream as ``before_proj(vace tokens) + video tokens``.
    """

    def __init__(self, config: DiTConfig, first: bool) -> None:
        super().__init__(config)
        if first:
            self.before_proj = nn.Linear(config.dim, config.dim)
        self.after_proj = nn.Linear(config.dim, config.dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, e0: torch.Tensor, context: Context,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "before_proj"):
            c = self.before_proj(c.to(self.modulation.dtype)).float() + x
        c = super().forward(c, e0, context, rope)
        return c, self.after_proj(c.to(self.modulation.dtype)).float()


class Head(nn.Module):
    """Final modulated LayerNorm and projection to ``out_dim * prod(patch)`` per token."""

    op_overrides: Mapping[str, Callable] | None = None  # this model's own ops (WanDiT.set_ops)

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x [B, L, dim]`` with ``e [B, dim]`` or per token ``[B, L, dim]``."""
        if e.ndim == 2:
            shift, scale = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)
        else:
            shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
        h = ops.get_op("modulate", self.op_overrides)(x, shift, scale, self.norm.eps)
        return self.head(h.to(self.modulation.dtype))


class ImageEmbedding(nn.Module):
    """CLIP features -> context tokens (LayerNorm, Linear, GELU, Linear, LayerNorm).

    FLF2V adds ``emb_pos`` over the first and last frame's tokens before the MLP.
    """

    def __init__(self, clip_dim: int, dim: int, pos_tokens: int = 0) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                  nn.Linear(clip_dim, dim), nn.LayerNorm(dim))
        if pos_tokens:
            self.emb_pos = nn.Parameter(torch.empty(1, pos_tokens, clip_dim))

    def forward(self, clip_feature: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            if clip_feature.shape[1] != self.emb_pos.shape[1]:
                raise ValueError(f"this model embeds first+last frame CLIP features of "
                                 f"{self.emb_pos.shape[1]} tokens, got {clip_feature.shape[1]}")
            clip_feature = clip_feature + self.emb_pos.to(clip_feature.dtype)
        return self.proj(clip_feature)


@dataclass
class DiTInputs:
    """The DiT's state between :meth:`WanDiT.prepare` and :meth:`WanDiT.finish`.

    Pipelines use it to skip blocks (step caching) or split ``tokens`` across ranks (sequence parallel).
    """

    tokens: torch.Tensor                          # [B, L, dim] float32 (reference tokens first)
    e: torch.Tensor                               # [B, dim] or per token [B, L, dim] time embedding (head)
    e0: torch.Tensor                              # [B, 6, dim] or per token [B, L, 6, dim] block modulation
    context: Context                              # rows [B, L_ctx, dim] (image tokens first), text bias
    rope: tuple[torch.Tensor, torch.Tensor]       # cos, sin [L, 1, head_dim/2]
    image_tokens: int
    grid: tuple[int, int, int]
    n_ref: int
    hints: list[torch.Tensor] | None
    vace_scale: float


class WanDiT(nn.Module):
    """Wan DiT: ``dit(x, timestep, context, clip_feature=..., y=...) -> [B, out_dim, F, H, W]``."""

    dtype_parameters: tuple[str, ...] = ("patch_embedding.weight",)  # WanDiT.dtype; see wan_models.ops
    attention_fn: AttentionFn | None = None  # own attention backend (set_attention_backend); None: process-wide
    op_overrides: Mapping[str, Callable] | None = None  # own elementwise ops (set_ops); others: process-wide
    identity: Identity | None = None  # family and expert role, set by the loader (wan_models.identity)

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.num_layers))
        self.head = Head(c)
        if c.image_input:
            self.img_emb = ImageEmbedding(c.clip_dim, c.dim, 514 if c.image_pos_emb else 0)
        if c.ref_conv:
            self.ref_conv = nn.Conv2d(c.out_dim, c.dim, kernel_size=c.patch_size[1:], stride=c.patch_size[1:])
        if c.camera_in_dim is not None:
            self.control_adapter = CameraAdapter(c.camera_in_dim, c.dim, c.patch_size[1:])
        if c.vace_layers:
            self.vace_blocks = nn.ModuleList(VaceBlock(c, first=i == 0) for i in range(len(c.vace_layers)))
            self.vace_patch_embedding = nn.Conv3d(c.vace_in_dim, c.dim, kernel_size=c.patch_size,
                                                  stride=c.patch_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # -- this model's own attention and ops (two DiTs in one process need not share them) --------

    def set_attention_backend(self, fn: AttentionFn | None) -> AttentionFn | None:
        """Attend with ``fn`` in this DiT's attention modules (``None``: the process-wide backend of
        :func:`wan_models.attention.set_attention_backend` again); returns the DiT's previous one."""
        if fn is not None and not callable(fn):
            raise TypeError(f"attention backend must be callable taking (q, k, v), got {fn!r}")
        previous = self.attention_fn
        for module in list(self.modules()):
            if hasattr(type(module), "attention_fn"):
                module.attention_fn = fn
        return previous

    def set_ops(self, overrides: Mapping[str, Callable] | None) -> Mapping[str, Callable] | None:
        """Use ``overrides`` (op name -> function, see :mod:`wan_models.ops`) in this DiT; ops it does
        not name, and all of them for ``None``, are the process-wide ones. Returns the previous overrides."""
        if overrides is not None:
            ops.check_overrides(overrides)
            overrides = dict(overrides)
        previous = self.op_overrides
        for module in self.modules():
            if hasattr(type(module), "op_overrides"):
                module.op_overrides = overrides
        return previous

    # -- stages, public so that pipelines (caching, sequence parallel) can compose them ----------

    def embed_time(self, timestep: torch.Tensor,
                   motion_embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e [B, dim], e0 [B, 6, dim])`` in float32, or per token ``(e [B, L, dim], e0 [B, L, 6, dim])``
        for a ``[B, L]`` timestep; ``motion_embedding`` offsets ``e0`` only."""
        t = sinusoid(timestep.reshape(-1), self.config.freq_dim)
        e = self.time_embedding(t.to(self.dtype)).float()
        e0 = self.time_projection(e.to(self.dtype)).float().unflatten(1, (6, self.config.dim))
        if is_per_token(timestep):
            e, e0 = e.unflatten(0, timestep.shape), e0.unflatten(0, timestep.shape)
        if motion_embedding is not None:  # one offset per video, broadcast over the tokens (no copy per token)
            motion = motion_embedding.float().unflatten(1, (6, self.config.dim))
            e0 = e0 + (motion.unsqueeze(1) if is_per_token(timestep) else motion)
        return e, e0

    def embed_context(self, context: torch.Tensor, clip_feature: torch.Tensor | None) -> Context:
        """Text tokens (trailing zero padding folded, :func:`fold_padding`), CLIP image tokens first on image models."""
        text, bias = fold_padding(context.to(self.dtype))
        rows = self.text_embedding(text)
        if clip_feature is None:
            return Context(rows, bias)
        image = self.img_emb(clip_feature.to(self.dtype))
        bias = None if bias is None else F.pad(bias, (image.shape[1], 0))
        return Context(torch.cat([image, rows], dim=1), bias)

    def embed_video(self, x: torch.Tensor, camera: torch.Tensor | None = None,
                    reference_latents: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int, int], int]:
        """Patch tokens ``[B, L, dim]`` (float32), the token grid and how many reference tokens lead."""
        tokens = self.patch_embedding(x.to(self.dtype))
        if camera is not None:
            tokens = tokens + self.control_adapter(camera.to(self.dtype))
        grid = tuple(tokens.shape[2:])
        # Contiguous (a copy in float32 too): compiled blocks then see the same tensor layout in
        # every block and share one graph (a view input guards on its base).
        tokens = tokens.flatten(2).transpose(1, 2).float().contiguous()
        n_ref = 0
        if reference_latents is not None:
            ref = self.ref_conv(reference_latents[:, :, 0].to(self.dtype)).flatten(2).transpose(1, 2)
            n_ref = ref.shape[1]
            tokens = torch.cat([ref.float(), tokens], dim=1)
            grid = (grid[0] + 1, *grid[1:])
        return tokens, grid, n_ref

    def embed_vace(self, vace_context: torch.Tensor) -> torch.Tensor:
        """VACE context ``[B, 96, F, H, W]`` -> hint-stream tokens ``[B, L, dim]`` (float32)."""
        return self.vace_patch_embedding(vace_context.to(self.dtype)).flatten(2).transpose(1, 2).float()

    def vace_hints(self, tokens: torch.Tensor, c: torch.Tensor, e0: torch.Tensor,
                   context: Context, rope: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """One hint per VACE block from the hint stream ``c`` (:meth:`embed_vace`), added after main
        block ``vace_layers[n]``."""
        hints = []
        for block in self.vace_blocks:
            c, hint = block(c, tokens, e0, context, rope)
            hints.append(hint)
        return hints

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, F*H*W, out*pt*ph*pw]`` -> ``[B, out, F*pt, H*ph, W*pw]``."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], -1, f * pt, h * ph, w * pw)

    # -- the whole forward ------------------------------------------------------------------------

    def prepare(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        clip_feature: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        camera: torch.Tensor | None = None,
        vace_context: torch.Tensor | None = None,
        vace_scale: float = 1.0,
        motion_embedding: torch.Tensor | None = None,
        image_attention_tokens: int | None = None,
    ) -> "DiTInputs":
        """Everything before the blocks: embeddings, RoPE tables and VACE hints (see :meth:`forward`)."""
        self._check_inputs(x, timestep, context, clip_feature, y, reference_latents, camera, vace_context)
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        e, e0 = self.embed_time(timestep, motion_embedding)
        context = self.embed_context(context, clip_feature)
        image_tokens = 0 if clip_feature is None else clip_feature.shape[1]
        if image_attention_tokens is not None:
            image_tokens = min(image_tokens, image_attention_tokens)
        tokens, grid, n_ref = self.embed_video(x, camera, reference_latents)
        rope = rope_tables(self.config.head_dim, grid, tokens.device)
        hints = None
        if vace_context is not None:
            hints = self.vace_hints(tokens, self.embed_vace(vace_context), e0, context, rope)
        return DiTInputs(tokens, e, e0, context, rope, image_tokens, grid, n_ref, hints, vace_scale)

    def run_blocks(self, inputs: "DiTInputs", tokens: torch.Tensor | None = None, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        """Blocks ``start`` to ``end - 1`` (default all; VACE hints added after their layers) on ``tokens``
        (default ``inputs.tokens``); step caches run a range and skip the rest."""
        end = len(self.blocks) if end is None else end
        if not 0 <= start <= end <= len(self.blocks):
            raise ValueError(f"block range start={start}, end={end} must satisfy 0 <= start <= end <= "
                             f"{len(self.blocks)} (the number of blocks)")
        tokens = inputs.tokens if tokens is None else tokens
        for i in range(start, end):
            tokens = self.blocks[i](tokens, inputs.e0, inputs.context, inputs.rope, inputs.image_tokens)
            if inputs.hints is not None and i in self.config.vace_layers:
                tokens = tokens + inputs.hints[self.config.vace_layers.index(i)] * inputs.vace_scale
        return tokens

    def finish(self, tokens: torch.Tensor, inputs: "DiTInputs") -> torch.Tensor:
        """Head and unpatchify, dropping the reference-image tokens; float32 ``[B, out, F, H, W]``."""
        f, h, w = inputs.grid
        out = self.head(tokens[:, inputs.n_ref:], inputs.e)
        return self.unpatchify(out, (f - (1 if inputs.n_ref else 0), h, w)).float()

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                **inputs: Any) -> torch.Tensor:
        """Predict the flow velocity for latents ``x [B, C, F, H, W]`` at ``timestep [B]`` (0..1000), or
        per token ``[B, L]`` with ``L = F*H*W / prod(patch)`` in the tokens' row-major (f, h, w) order.

        ``context [B, L, text_dim]`` (padded rows are attended, as in the reference; trailing zero
        rows are folded into one, which gives the same result: :func:`fold_padding`). Keyword inputs:
        ``clip_feature [B, 257*k, clip_dim]`` and ``y`` (concatenated to ``x`` on channels) for image
        models; ``reference_latents [B, 16, 1, H, W]`` (Fun V1.1), ``camera [B, 24, F, 8H, 8W]``
        (Control-Camera), ``vace_context [B, 96, F, H, W]`` with ``vace_scale`` (VACE),
        ``motion_embedding [B, 6*dim]`` (speed control). ``image_attention_tokens`` caps how many
        CLIP tokens go to the image attention: ``None`` = all (official FLF2V), 257 = DiffSynth's FLF2V.
        Returns float32 ``[B, out_dim, F, H, W]``.
        """
        prepared = self.prepare(x, timestep, context, **inputs)
        return self.finish(self.run_blocks(prepared), prepared)

    def _check_inputs(self, x, timestep, context, clip_feature, y, reference_latents, camera, vace_context) -> None:
        c = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W] latents, got shape {tuple(x.shape)}")
        channels = x.shape[1] + (0 if y is None else y.shape[1])
        if channels != c.in_dim:
            raise ValueError(f"x ({x.shape[1]} channels) + y ({0 if y is None else y.shape[1]}) = {channels} "
                             f"channels, but this {c.variant} model takes in_dim={c.in_dim}")
        pt, ph, pw = c.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch {c.patch_size}")
        expected = [x.shape[0], x.shape[2] // pt * (x.shape[3] // ph) * (x.shape[4] // pw)]
        if is_per_token(timestep):
            if list(timestep.shape) != expected:
                raise ValueError(f"per-token timestep must be [B, L] = {expected} (batch, patched tokens "
                                 f"of x {tuple(x.shape[2:])}), got {list(timestep.shape)}")
            if reference_latents is not None:
                raise ValueError("per-token timesteps cannot be combined with reference_latents")
        elif timestep.numel() not in (1, x.shape[0]):
            raise ValueError(f"timestep has {timestep.numel()} values for a batch of {x.shape[0]}: give "
                             f"[{x.shape[0]}] or per token [B, L] = {expected}")
        if context.ndim != 3 or context.shape[-1] != c.text_dim:
            raise ValueError(f"context must be [B, L, {c.text_dim}], got {tuple(context.shape)}")
        if (clip_feature is None) == c.image_input:
            raise ValueError("this model needs clip_feature" if c.image_input
                             else "clip_feature given, but this model has no image input")
        for name, value, supported in (("reference_latents", reference_latents, c.ref_conv),
                                       ("camera", camera, c.camera_in_dim is not None),
                                       ("vace_context", vace_context, bool(c.vace_layers))):
            if value is not None and not supported:
                raise ValueError(f"{name} given, but this {c.variant} model has no input for it")
