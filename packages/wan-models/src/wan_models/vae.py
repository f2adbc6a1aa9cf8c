"""Wan-VAE: the causal 3D video autoencoder of ``Wan2.1_VAE.pth``.

Video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] maps to latents ``[B, z_dim, 1 + k, H/8, W/8]`` and back.
Both directions stream over time, as the released model does: encoding feeds frame 0 alone and then
4 frames at a time, decoding one latent frame at a time. Each causal layer keeps the last frames it
saw in a :class:`StreamCache`, so a streamed pass equals the released model's output while memory
stays bounded by one chunk. Spatial tiling with linear blending (DiffSynth's scheme) bounds memory
for large frames. Parameter names are those of the released checkpoint (``encoder.*``, ``conv1.*``,
``conv2.*``, ``decoder.*``, norm scales ``gamma``), so it loads with ``strict=True``.

Wrap calls in ``torch.no_grad()`` for inference: a streamed pass with autograd keeps every chunk's graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Released latent statistics: normalised latents are (mu - mean) / std per channel.
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
ENCODE_CHUNK = 4  # video frames per encoder step after the first frame


@dataclass
class VAEConfig:
    """Sizes of one Wan-VAE; defaults are the released ``Wan2.1_VAE.pth``.

    Field names are the official ``WanVAE_`` constructor kwargs (``temperal_downsample`` spelling
    included), so ``VAEConfig(**official_kwargs)`` works; lists are turned into tuples.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self) -> None:
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.attn_scales = tuple(float(s) for s in self.attn_scales)
        self.temperal_downsample = tuple(bool(t) for t in self.temperal_downsample)
        self.latents_mean = tuple(float(v) for v in self.latents_mean)
        self.latents_std = tuple(float(v) for v in self.latents_std)
        if self.dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or not self.dim_mult:
            raise ValueError(f"dim, z_dim, num_res_blocks must be positive and dim_mult non-empty: {self}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} flags (one per downsample), "
                             f"got {list(self.temperal_downsample)}")
        if sum(self.temperal_downsample) > 2:
            raise ValueError(f"at most 2 temporal downsamples fit the 4-frame encoder chunks, "
                             f"got temperal_downsample={list(self.temperal_downsample)}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, z_dim is {self.z_dim}")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8 for the release)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for the release)."""
        return 2 ** sum(self.temperal_downsample)


class StreamCache:
    """State one streamed encode/decode carries from a time chunk to the next.

    Each causal layer stores, under itself as key, the trailing input frames the next chunk needs
    (two for a 3-tap causal conv, one for a stride-2 time conv); ``first_chunk`` tells the
    temporal resamplers to pass the first chunk through, as the released model does.
    """

    def __init__(self) -> None:
        self.first_chunk = True
        self._past: dict[nn.Module, torch.Tensor] = {}

    def past(self, layer: nn.Module) -> torch.Tensor | None:
        """The frames ``layer`` kept from the previous chunk (``None`` before its first call)."""
        return self._past.get(layer)

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        """Replaces ``layer``'s kept frames; a copy, so the whole chunk they were cut from can be freed."""
        self._past[layer] = frames.clone()

    @property
    def nbytes(self) -> int:
        """Memory the kept frames take; it stops changing after the second chunk."""
        return sum(t.numel() * t.element_size() for t in self._past.values())


def _use_onednn(x: torch.Tensor) -> bool:
    """Whether to call oneDNN directly: PyTorch sends small float32 CPU conv3d inputs (batch·C·T·H up to
    20480, e.g. one frame of a tile) to its im2col kernel, measured 1.1-5x slower here (no autograd)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads time only on the past side (zeros before frame 0, cached frames later)
    and pads H and W symmetrically to keep their size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1

    def input_buffer(self, like: torch.Tensor, cache: StreamCache) -> tuple[torch.Tensor, torch.Tensor]:
        """``[past | new]`` input for ``like.shape[2]`` new frames, past filled in; returns it and
        the view of the new-frame slot, so the producer can write there instead of concatenating."""
        b, c, t, h, w = like.shape
        stream = like.new_empty(b, c, self.past_frames + t, h, w)
        past = cache.past(self)
        if past is None:
            stream[:, :, : self.past_frames].zero_()
        else:
            stream[:, :, : self.past_frames] = past
        return stream, stream[:, :, self.past_frames :]

    def convolve(self, stream: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """Convolves a filled :meth:`input_buffer` and keeps its last frames for the next chunk. oneDNN
        copies the weight per call, so weights over 32 MiB (Wan2.2's) go in slices of output channels."""
        cache.keep(self, stream[:, :, -self.past_frames :])
        if not _use_onednn(stream):
            return super().forward(stream)
        step = -(-len(self.weight) // -(-self.weight.nbytes // 2**25))  # ceil(out / ceil(MiB / 32))
        parts = [torch.mkldnn_convolution(stream, self.weight[o:o + step], self.bias[o:o + step], self.padding,
                                          self.stride, self.dilation, self.groups)
                 for o in range(0, len(self.weight), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        stream, new = self.input_buffer(x, cache)
        new.copy_(x)
        return self.convolve(stream, cache)


def normalize_channels(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.normalize(x, dim=1)``: ``x`` over its L2 norm across channels (at least 1e-12).

    On the CPU through a sum of squares: PyTorch's vector-norm kernel reduces the strided channel
    axis slowly (8x slower for 8 channels, 1.5x for 32), and norms were half of a tiny VAE's encode.
    """
    if x.device.type != "cpu":
        return F.normalize(x, dim=1, out=out)
    norm = x.square().sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()  # = max(||x||, 1e-12), finite gradients
    return torch.div(x, norm, out=out)


class RMSNorm(nn.Module):
    """L2-normalises over channels (dim 1) and scales by sqrt(C)·gamma; ``spatial_dims`` is 3 for
    ``[B, C, T, H, W]`` and 2 for ``[N, C, H, W]`` inputs (it fixes gamma's released shape)."""

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_channels(x) * self.scale * self.gamma


def _norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: StreamCache,
                    dropout: nn.Dropout | None = None) -> torch.Tensor:
    """RMSNorm -> SiLU (-> dropout) -> causal conv. Without autograd the activations are written
    straight into the conv's ``[past | new]`` buffer (no concatenation copy, no temporaries), with
    the same operations in the same order; ``out=`` and in-place kernels have no autograd, so with
    gradients on the allocating path runs."""
    if torch.is_grad_enabled():
        h = F.silu(norm(x))
        return conv(h if dropout is None else dropout(h), cache)
    stream, new = conv.input_buffer(x, cache)
    normalize_channels(x, out=new).mul_(norm.scale).mul_(norm.gamma)
    F.silu(new, inplace=True)
    if dropout is not None:
        F.dropout(new, dropout.p, dropout.training, inplace=True)
    return conv.convolve(stream, cache)


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, causal 3x3x3 conv) twice plus a 1x1x1 shortcut when widths differ."""

    children_read_directly: tuple[str, ...] = ("residual",)  # _norm_silu_conv; see wan_models.ops

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Sequential indices give the released key names (residual.0.gamma, residual.2.weight, ...).
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        shortcut = self.shortcut(x)
        x = _norm_silu_conv(norm1, conv1, x, cache)
        return _norm_silu_conv(norm2, conv2, x, cache, dropout).add_(shortcut)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        qkv = self.to_qkv(frames).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        # Plain SDPA, not the DiT attention hook: the head dim is the full width (384 released),
        # beyond what fused attention kernels usually take.
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        out = self.proj(out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return out.view(b, t, c, h, w).transpose(1, 2) + x


class Resample(nn.Module):
    """2x spatial up/downsampling per frame, optionally with a 2x temporal up/downsampling conv.

    ``upsample3d`` turns each frame into two with a causal time conv (``dim -> 2·dim`` channels,
    the halves being the two frames) before the spatial step; ``downsample3d`` halves the frames
    with a stride-2 time conv over the previous chunk's last frame and this chunk after the
    spatial step. Both leave the stream's first chunk unchanged in time, as the released model does.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right/bottom by one, then a strided 3x3 conv: H -> floor(H / 2)
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and not cache.first_chunk:
            # [B, (2, C), T] -> frames ordered (T, 2): each input frame becomes two consecutive ones.
            pairs = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            t *= 2
            frames = pairs.permute(0, 3, 1, 2, 4, 5).reshape(b * t, c, h, w)
        else:
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = self.resample(frames)
        x = frames.view(b, t, *frames.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            last = x[:, :, -1:]
            if not cache.first_chunk:
                x = self.time_conv(torch.cat([cache.past(self), x], dim=2))
            cache.keep(self, last)
        return x


def _run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    """Runs blocks in order; all but attention (which stays within a frame) need the stream cache."""
    for block in blocks:
        x = block(x) if isinstance(block, AttentionBlock) else block(x, cache)
    return x


class Encoder3d(nn.Module):
    """Video chunk -> ``2·z_dim`` channels (mu, log-variance) at 1/8 size, 1/4 frames."""

    children_read_directly: tuple[str, ...] = ("head",)  # _norm_silu_conv; see wan_models.ops

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, cfg.dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, cfg.dropout))
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, cfg.z_dim * 2, 3))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = _run_blocks((*self.downsamples, *self.middle), self.conv1(x, cache), cache)
        return _norm_silu_conv(self.head[0], self.head[2], x, cache)


class Decoder3d(nn.Module):
    """Latent chunk -> video frames (``3`` channels) at 8x size, 4x frames after the first."""

    children_read_directly: tuple[str, ...] = ("head",)  # _norm_silu_conv; see wan_models.ops

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], cfg.dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], cfg.dropout))
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the upsample before this level halved the channels
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3))
        # Split after each temporal upsample: a later segment never mixes frames beyond its causal cache.
        cuts = [i + 1 for i, m in enumerate(layers) if isinstance(m, Resample) and m.mode == "upsample3d"]
        bounds = [0, *cuts, len(layers)]
        self.segments = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """Decodes one latent chunk depth-first: each segment between temporal upsamples runs one of
        its input frames at a time, so the wide full-resolution layers hold one frame instead of
        four. With the causal cache that is the same computation at a fraction of the peak memory."""
        x = _run_blocks(self.middle, self.conv1(x, cache), cache)
        frames: list[torch.Tensor] = []
        self._decode_segment(0, x, cache, frames)
        return torch.cat(frames, dim=2)

    def _decode_segment(self, level: int, x: torch.Tensor, cache: StreamCache, frames: list[torch.Tensor]) -> None:
        x = _run_blocks([self.upsamples[i] for i in self.segments[level]], x, cache)
        if level + 1 == len(self.segments):
            frames.append(_norm_silu_conv(self.head[0], self.head[2], x, cache))
            return
        for t in range(x.shape[2]):
            self._decode_segment(level + 1, x[:, :, t:t + 1], cache, frames)


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    if len(value) != 2 or any(int(v) != v or v < 1 for v in value):
        raise ValueError(f"{name} must be two positive integers (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def _tile_spans(extent: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Tiles at 0, stride, 2·stride, ... (clipped to ``extent``), skipping a start once the previous
    tile already reaches the end (DiffSynth's rule)."""
    return [(s, min(s + size, extent)) for s in range(0, extent, stride)
            if not (s >= stride and s - stride + size >= extent)]


def _ramp(length: int, border: int, open_start: bool, open_end: bool) -> torch.Tensor:
    """Blend weights along one axis: 1, rising linearly (1..border)/border on sides shared with another tile."""
    weights = torch.ones(length)
    if border > 0:
        rise = torch.arange(1, border + 1, dtype=torch.float32) / border
        if open_start:
            weights[:border] = rise
        if open_end:
            weights[-border:] = rise.flip(0)
    return weights


class WanVAE(nn.Module):
    """The Wan 2.1 video VAE (released key layout); see the module docstring for shapes."""

    # Pipelines take the VAE's dtype from its first parameter; see wan_models.ops.
    dtype_parameters: tuple[str, ...] = ("encoder.conv1.weight",)

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder3d(config)
        self.conv1 = nn.Conv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and 1/std as ``[1, z, 1, 1, 1]`` (1/std taken in float32, as the references do)."""
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=like.device)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=like.device)
        return mean.to(like.dtype).view(1, -1, 1, 1, 1), inv_std.to(like.dtype).view(1, -1, 1, 1, 1)

    # ---- encode --------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor, *, normalize: bool = True, tiled: bool = False,
               tile_size: Sequence[int] = (30, 52), tile_stride: Sequence[int] = (15, 26)) -> torch.Tensor:
        """Video ``[B, 3, 1+4k, H, W]`` in [-1, 1] -> latent mean ``[B, z, 1+k, H/8, W/8]``.

        ``normalize`` returns ``(mu - mean) / std`` (what the DiT consumes), else the raw mu.
        ``tiled`` encodes overlapping spatial tiles one at a time; sizes are in latent units.
        """
        if video.dim() != 5:
            raise ValueError(f"video must be [B, 3, T, H, W], got shape {tuple(video.shape)}")
        _, c, t, h, w = video.shape
        f = self.config.spatial_factor
        if c != 3:
            raise ValueError(f"video must have 3 channels (RGB), got {c} (shape {tuple(video.shape)})")
        if (t - 1) % ENCODE_CHUNK:
            raise ValueError(f"video has {t} frames; the causal encoder takes 1 + 4k frames (1, 5, 9, ..., 81)")
        if h < f or w < f:
            raise ValueError(f"video frames {h}x{w} are smaller than one latent pixel ({f}x{f})")
        if not tiled:
            return self._encode_clip(video, normalize)
        size, stride = self._tiling(tile_size, tile_stride)
        out_shape = (video.shape[0], self.config.z_dim, 1 + (t - 1) // self.config.temporal_factor, h // f, w // f)
        return self._tiled(lambda v: self._encode_clip(v, normalize), video, out_shape,
                           (size[0] * f, size[1] * f), (stride[0] * f, stride[1] * f), lambda p: p // f)

    def _encode_clip(self, video: torch.Tensor, normalize: bool) -> torch.Tensor:
        cache = StreamCache()
        features = []
        later = (video[:, :, s:s + ENCODE_CHUNK] for s in range(1, video.shape[2], ENCODE_CHUNK))
        for chunk in (video[:, :, :1], *later):
            features.append(self.encoder(chunk, cache))
            cache.first_chunk = False
        logger.debug("encoded %d chunks, stream cache %.1f MiB", len(features), cache.nbytes / 2**20)
        mu = self.conv1(torch.cat(features, dim=2))[:, : self.config.z_dim]
        if not normalize:
            return mu.contiguous()
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    # ---- decode --------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, *, normalized: bool = True, clamp: bool = True, tiled: bool = False,
               tile_size: Sequence[int] = (30, 52), tile_stride: Sequence[int] = (15, 26)) -> torch.Tensor:
        """Latents ``[B, z, T, h, w]`` -> video ``[B, 3, 1+4(T-1), 8h, 8w]``.

        ``normalized`` says the latents are ``(mu - mean) / std`` (as :meth:`encode` returns them);
        ``clamp`` limits the video to [-1, 1] as the released wrappers do. ``tiled`` decodes
        overlapping spatial tiles one at a time; sizes are in latent units.
        """
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, z_dim, T, h, w], got shape {tuple(latents.shape)}")
        b, z, t, h, w = latents.shape
        if z != self.config.z_dim:
            raise ValueError(f"latents have {z} channels, this VAE has z_dim={self.config.z_dim}")
        if not tiled:
            video = self._decode_clip(latents, normalized)
        else:
            size, stride = self._tiling(tile_size, tile_stride)
            f = self.config.spatial_factor
            out_shape = (b, 3, 1 + (t - 1) * self.config.temporal_factor, h * f, w * f)
            video = self._tiled(lambda z_: self._decode_clip(z_, normalized), latents, out_shape,
                                size, stride, lambda p: p * f)
        return video.clamp_(-1.0, 1.0) if clamp else video

    def _decode_clip(self, latents: torch.Tensor, normalized: bool) -> torch.Tensor:
        if normalized:
            mean, inv_std = self._stats(latents)
            latents = latents / inv_std + mean
        x = self.conv2(latents)
        cache = StreamCache()
        video = None
        start = 0
        for i in range(x.shape[2]):
            frames = self.decoder(x[:, :, i:i + 1], cache)
            cache.first_chunk = False
            if video is None:  # size the output once the first frame shows the decoded resolution
                b, c, _, h, w = frames.shape
                video = frames.new_empty(b, c, 1 + (x.shape[2] - 1) * self.config.temporal_factor, h, w)
            video[:, :, start:start + frames.shape[2]] = frames
            start += frames.shape[2]
        logger.debug("decoded %d latent frames, stream cache %.1f MiB", x.shape[2], cache.nbytes / 2**20)
        return video

    # ---- tiling --------------------------------------------------------------------------------

    @staticmethod
    def _tiling(tile_size: Sequence[int], tile_stride: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
        size, stride = _pair(tile_size, "tile_size"), _pair(tile_stride, "tile_stride")
        for axis, sz, st in (("height", size[0], stride[0]), ("width", size[1], stride[1])):
            if st > sz:
                raise ValueError(f"tile_stride {stride} exceeds tile_size {size} in {axis}: tiles would leave gaps")
        return size, stride

    @staticmethod
    def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_shape: tuple[int, ...],
               size: tuple[int, int], stride: tuple[int, int], to_out: Callable[[int], int]) -> torch.Tensor:
        """Runs ``fn`` on overlapping H/W tiles of ``x`` and blends the results linearly.

        ``size``/``stride`` are in input units, ``to_out`` maps an input offset to output units.
        Each output pixel is the mask-weighted mean of the tiles covering it; a tile's mask ramps
        over ``size - stride`` (output units) on the sides it shares with neighbours.
        """
        height, width = x.shape[-2:]
        rows, cols = _tile_spans(height, size[0], stride[0]), _tile_spans(width, size[1], stride[1])
        logger.debug("tiling %s into %d x %d tiles", tuple(x.shape), len(rows), len(cols))
        border_h, border_w = to_out(size[0] - stride[0]), to_out(size[1] - stride[1])
        out = x.new_zeros(out_shape)
        weight = x.new_zeros(out_shape[-2:])
        for h0, h1 in rows:
            for w0, w1 in cols:
                tile = fn(x[..., h0:h1, w0:w1])
                th, tw = tile.shape[-2:]
                mask = torch.minimum(_ramp(th, border_h, h0 > 0, h1 < height)[:, None],
                                     _ramp(tw, border_w, w0 > 0, w1 < width)[None, :]).to(tile)
                oh, ow = to_out(h0), to_out(w0)
                out[..., oh:oh + th, ow:ow + tw] += tile.mul_(mask)
                weight[oh:oh + th, ow:ow + tw] += mask
        return out.div_(weight)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """Infers the :class:`VAEConfig` of a checkpoint from its key names and shapes.

    Raises ``ValueError`` naming the key or layer it cannot place, and checks the result by
    comparing every key and shape with a model built from it (on the meta device).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            hint = ""
            if any(k.startswith("model.encoder.") for k in state_dict):
                hint = " (keys carry DiffSynth's 'model.' prefix; strip it first)"
            raise ValueError(f"not a Wan-VAE state dict: no {key!r}{hint}")
        return tuple(state_dict[key].shape)

    dim = shape("encoder.conv1.weight")[0]
    z_dim = shape("conv2.weight")[0]
    if shape("conv1.weight")[0] != 2 * z_dim:
        raise ValueError(f"conv1.weight {shape('conv1.weight')} should have 2·z_dim = {2 * z_dim} outputs")

    prefix = "encoder.downsamples."
    indices = sorted({int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)})
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"encoder.downsamples indices {indices} are not 0..n-1")
    levels: list[dict] = [{"blocks": 0, "attention": False, "width": None}]
    temporal: list[bool] = []
    for i in indices:
        layer = f"{prefix}{i}."
        if layer + "residual.2.weight" in state_dict:
            levels[-1]["blocks"] += 1
            levels[-1]["width"] = shape(layer + "residual.2.weight")[0]
        elif layer + "to_qkv.weight" in state_dict:
            levels[-1]["attention"] = True
        elif layer + "resample.1.weight" in state_dict:
            temporal.append(layer + "time_conv.weight" in state_dict)
            levels.append({"blocks": 0, "attention": False, "width": None})
        else:
            keys = sorted(k for k in state_dict if k.startswith(layer))[:4]
            raise ValueError(f"unrecognised layer {layer[:-1]} (keys {keys}): not a residual, attention or resample block")
    blocks = {level["blocks"] for level in levels}
    if len(blocks) != 1 or 0 in blocks:
        raise ValueError(f"residual blocks per encoder level differ or are missing: {[lv['blocks'] for lv in levels]}")
    widths = [level["width"] for level in levels]
    if any(wd % dim for wd in widths):
        raise ValueError(f"encoder level widths {widths} are not multiples of dim {dim}")
    if z_dim != len(LATENTS_MEAN):
        raise ValueError(f"z_dim {z_dim}: the released latent statistics cover {len(LATENTS_MEAN)} channels "
                         "(a 48-channel file is the Wan2.2 VAE, which this module does not implement)")
    config = VAEConfig(
        dim=dim, z_dim=z_dim, dim_mult=tuple(wd // dim for wd in widths), num_res_blocks=blocks.pop(),
        attn_scales=tuple(1.0 / 2**i for i, level in enumerate(levels) if level["attention"]),
        temperal_downsample=tuple(temporal),
    )
    return check_inferred(WanVAE, config, state_dict)


def check_inferred(module: type[nn.Module], config: Any, state_dict: Mapping[str, torch.Tensor]) -> Any:
    """``config`` if ``module(config)`` (built on meta) has exactly the keys and shapes of ``state_dict``."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in module(config).state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state_dict.keys() if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"state dict does not match inferred {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    return config
