"""Wan2.2-VAE: the causal 3D video autoencoder of ``Wan2.2_VAE.pth`` (TI2V-5B).

Video ``[B, 3, 1 + 4k, H, W]`` in [-1, 1] (H, W multiples of 16) maps to latents
``[B, 48, 1 + k, H/16, W/16]`` and back. Against the Wan 2.1 VAE (:mod:`wan_models.vae`, whose
blocks, stream cache, chunking and tiling this module reuses) it differs in:

- a 2x2 space-to-channel patchify before the encoder (12 channels) and its inverse after the decoder;
- residual stages: each encoder stage adds an ``AvgDown3D`` shortcut of its input (space/time
  folded into channels, averaged over channel groups), each decoder stage has ``num_res_blocks + 1``
  residual blocks and a ``DupUp3D`` shortcut (channels repeated, then depth-to-space; the stream's
  first chunk drops its first ``factor_t - 1`` frames); decoder upsamples keep the width;
- a decoder width ``dec_dim`` of its own, and 48 latent channels with their own statistics.

Streaming is the released one: encoding feeds frame 0 alone and then 4 frames at a time, decoding
one latent frame at a time (depth-first, as the Wan 2.1 decoder). Parameter names are the released
checkpoint's, so it loads with ``strict=True``. Wrap calls in ``torch.no_grad()`` for inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vae import (AttentionBlock, CausalConv3d, Decoder3d, Resample, ResidualBlock, RMSNorm, StreamCache, VAEConfig,
                  WanVAE, _norm_silu_conv, _run_blocks, check_inferred)

# Released latent statistics (``Wan2_2_VAE.__init__`` of Wan-Video/Wan2.2): z = (mu - mean) / std.
LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
PATCH = 2  # pixels per side folded into channels before the encoder


@dataclass
class VAE22Config(VAEConfig):
    """Sizes of one Wan2.2-VAE; defaults are the released ``Wan2.2_VAE.pth``.

    Field names are the official ``WanVAE_`` kwargs. ``dim`` is the encoder width, ``dec_dim`` the
    decoder's. ``attn_scales`` is accepted as the official class accepts it: its stages have no attention.
    """

    dim: int = 160
    z_dim: int = 48
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    dec_dim: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dec_dim < 1:
            raise ValueError(f"dec_dim must be positive: {self}")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (16 for the release: the 2x2 patchify, then 2x per downsample)."""
        return PATCH * 2 ** (len(self.dim_mult) - 1)


def patchify(video: torch.Tensor) -> torch.Tensor:
    """``b c f (h q) (w r) -> b (c r q) f h w`` with q = r = 2."""
    b, c, t, h, w = video.shape
    x = video.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c, t, h, w = x.shape
    x = x.view(b, c // (PATCH * PATCH), PATCH, PATCH, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c // (PATCH * PATCH), t, h * PATCH, w * PATCH)


def avg_down(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """``AvgDown3D``: left-pads time to a multiple of ``factor_t``, folds the ``factor_t x factor_s x
    factor_s`` neighbourhoods into channels (``c, t, h, w`` order) and averages consecutive channel groups."""
    x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % factor_t, 0))
    b, c, t, h, w = x.shape
    t, h, w = t // factor_t, h // factor_s, w // factor_s
    x = x.view(b, c, t, factor_t, h, factor_s, w, factor_s).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, out_channels, -1, t, h, w).mean(dim=2)


def dup_up(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """``DupUp3D``: repeats each channel, then unfolds channels into ``factor_t x factor_s x factor_s``
    neighbourhoods; the stream's first chunk drops its first ``factor_t - 1`` frames."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_channels * factor_t * factor_s * factor_s // c, dim=1)
    x = x.view(b, out_channels, factor_t, factor_s, factor_s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_channels, t * factor_t, h * factor_s, w * factor_s)
    return x[:, :, factor_t - 1:] if first_chunk else x


class Resample22(Resample):
    """:class:`~wan_models.vae.Resample` whose upsampling conv keeps the width (``upsample_out_dim=dim``)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__(dim, mode)
        if mode.startswith("up"):
            self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


def _stage(in_dim: int, out_dim: int, blocks: int, dropout: float, resample: str | None) -> nn.Sequential:
    """``blocks`` residual blocks to ``out_dim``, then the ``resample`` mode's :class:`Resample22` if any."""
    layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(blocks)]
    if resample is not None:
        layers.append(Resample22(out_dim, resample))
    return nn.Sequential(*layers)


class DownStage(nn.Module):
    """``Down_ResidualBlock``: residual blocks, an optional downsample, plus the ``AvgDown3D`` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, dropout: float, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.downsamples = _stage(in_dim, out_dim, blocks, dropout, ("downsample3d" if temporal else "downsample2d")
                                  if spatial else None)
        self.out_dim, self.factor_t, self.factor_s = out_dim, 2 if temporal else 1, 2 if spatial else 1

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return _run_blocks(self.downsamples, x, cache) + avg_down(x, self.out_dim, self.factor_t, self.factor_s)


class UpStage(nn.Module):
    """``Up_ResidualBlock``: residual blocks and, except for the last stage, an upsample plus the
    ``DupUp3D`` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, dropout: float, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.upsamples = _stage(in_dim, out_dim, blocks, dropout, ("upsample3d" if temporal else "upsample2d")
                                if spatial else None)
        self.out_dim, self.factor_t, self.spatial = out_dim, 2 if temporal else 1, spatial

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        out = _run_blocks(self.upsamples, x, cache)
        if not self.spatial:
            return out
        return out + dup_up(x, self.out_dim, self.factor_t, 2, cache.first_chunk)


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


class Encoder22(nn.Module):
    """Video chunk -> ``2·z_dim`` channels (mu, log-variance) at 1/16 size, 1/4 frames."""

    children_read_directly: tuple[str, ...] = ("head",)  # _norm_silu_conv; see wan_models.ops

    def __init__(self, cfg: VAE22Config) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3)
        self.downsamples = nn.Sequential(*(
            DownStage(a, b, cfg.num_res_blocks, cfg.dropout, i < last and cfg.temperal_downsample[i], i < last)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))))
        self.middle = _middle(dims[-1], cfg.dropout)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], cfg.z_dim * 2, 3))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = _run_blocks((*self.downsamples, *self.middle), self.conv1(patchify(x), cache), cache)
        return _norm_silu_conv(self.head[0], self.head[2], x, cache)


class Decoder22(Decoder3d):
    """Latent chunk -> video frames (3 channels) at 16x size, 4x frames after the first, depth-first as
    :class:`~wan_models.vae.Decoder3d` decodes (``DupUp3D`` too maps each frame to its own output frames)."""

    def __init__(self, cfg: VAE22Config) -> None:
        nn.Module.__init__(self)  # not Decoder3d.__init__, which would build the Wan 2.1 network
        dims = [cfg.dec_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal, last = cfg.temperal_downsample[::-1], len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = _middle(dims[0], cfg.dropout)
        self.upsamples = nn.Sequential(*(
            UpStage(a, b, cfg.num_res_blocks + 1, cfg.dropout, i < last and temporal[i], i < last)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))))
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3 * PATCH * PATCH, 3))
        cuts = [i + 1 for i, stage in enumerate(self.upsamples) if stage.factor_t == 2]
        bounds = [0, *cuts, len(self.upsamples)]
        self.segments = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return unpatchify(super().forward(x, cache))


class WanVAE22(WanVAE):
    """The Wan 2.2 video VAE (released key layout). Encoding, decoding, streaming and tiling are
    :class:`~wan_models.vae.WanVAE`'s, with this network's encoder and decoder."""

    def __init__(self, config: VAE22Config | None = None) -> None:
        nn.Module.__init__(self)  # not WanVAE.__init__, which would build the Wan 2.1 network
        self.config = config = config or VAE22Config()
        self.encoder = Encoder22(config)
        self.conv1 = nn.Conv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder22(config)

    def encode(self, video: torch.Tensor, *, normalize: bool = True, tiled: bool = False,
               tile_size: Sequence[int] = (30, 52), tile_stride: Sequence[int] = (15, 26)) -> torch.Tensor:
        """Video ``[B, 3, 1+4k, H, W]`` in [-1, 1], H and W multiples of 16 -> latents ``[B, 48, 1+k, H/16, W/16]``;
        see :meth:`WanVAE.encode` for the options (tile sizes in latent units)."""
        f = self.config.spatial_factor
        if video.dim() == 5 and (video.shape[-2] % f or video.shape[-1] % f):
            raise ValueError(f"video frames {video.shape[-2]}x{video.shape[-1]}: the Wan2.2 VAE needs height and "
                             f"width that are multiples of {f}")
        return super().encode(video, normalize=normalize, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)

    def decode(self, latents: torch.Tensor, *, normalized: bool = True, clamp: bool = True, tiled: bool = False,
               tile_size: Sequence[int] = (30, 52), tile_stride: Sequence[int] = (15, 26)) -> torch.Tensor:
        """Latents ``[B, 48, T, h, w]`` -> video ``[B, 3, 1+4(T-1), 16h, 16w]``, clamped to [-1, 1] unless
        ``clamp=False``; see :meth:`WanVAE.decode` for the options (tile sizes in latent units)."""
        return super().decode(latents, normalized=normalized, clamp=clamp, tiled=tiled, tile_size=tile_size,
                              tile_stride=tile_stride)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> VAE22Config:
    """Infers the :class:`VAE22Config` of a checkpoint from its key names and shapes.

    Raises ``ValueError`` naming what it cannot place, and checks every key and shape against a
    model built from the result (on the meta device).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"not a Wan2.2-VAE state dict: no {key!r}")
        return tuple(state_dict[key].shape)

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)})

    dim, z_dim = shape("encoder.conv1.weight")[0], shape("conv2.weight")[0]
    stages = count("encoder.downsamples.")
    blocks = sum(f"encoder.downsamples.0.downsamples.{j}.residual.2.weight" in state_dict
                 for j in range(count("encoder.downsamples.0.downsamples.")))
    if stages < 1 or blocks < 1:
        raise ValueError(f"not a Wan2.2-VAE state dict: {stages} encoder stages, {blocks} residual blocks in stage 0")
    widths = [shape(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0] for i in range(stages)]
    if any(wd % dim for wd in widths):
        raise ValueError(f"encoder stage widths {widths} are not multiples of dim {dim}")
    dim_mult = tuple(wd // dim for wd in widths)
    temporal = tuple(f"encoder.downsamples.{i}.downsamples.{blocks}.time_conv.weight" in state_dict
                     for i in range(stages - 1))
    dec_dim = shape("decoder.head.0.gamma")[0] // dim_mult[0]
    if z_dim != len(LATENTS_MEAN):
        raise ValueError(f"z_dim {z_dim}: the released Wan2.2 latent statistics cover {len(LATENTS_MEAN)} channels")
    config = VAE22Config(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=blocks,
                         temperal_downsample=temporal)
    return check_inferred(WanVAE22, config, state_dict)
