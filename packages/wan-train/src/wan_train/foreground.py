"""Foreground masks: where a clip differs from its background, in pixels and on the latent grid.

Small moving objects on plain backgrounds cover a few percent of a clip; an unweighted loss is then
ruled by the background, which a network learns first and alone. Both trainers can weight the
foreground up (``wan_train.vae --fg_weight``, ``wan_train --foreground_weight``).
"""

from __future__ import annotations

import torch

__all__ = ["FAR", "foreground_mask", "latent_foreground", "weighted"]

FAR = 0.25  # a pixel is foreground when a channel differs from the clip's median by more (video in [-1, 1])


def foreground_mask(video: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, H, W]`` booleans: pixels of ``video`` (``[B, 3, T, H, W]`` in [-1, 1]) far from their
    clip's median colour, which is the background of a mostly-background clip."""
    median = video.flatten(2).median(dim=2).values.view(video.shape[0], video.shape[1], 1, 1, 1)
    return (video - median).abs().amax(dim=1, keepdim=True) > FAR


def latent_foreground(mask: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """A pixel mask ``[B, 1, T, H, W]`` on the latent grid ``(T', H', W')`` of a causal video VAE:
    latent frame 0 covers pixel frame 0, latent frame k the next ``(T - 1) / (T' - 1)`` frames, each latent
    pixel an ``H / H'`` x ``W / W'`` block. A latent cell is foreground (1.0) if any pixel it covers is."""
    frames, height, width = latent_shape
    b, _, t, h, w = mask.shape
    if h % height or w % width or (frames > 1 and (t - 1) % (frames - 1)) or (frames == 1 and t != 1):
        raise ValueError(f"a {t}x{h}x{w} pixel mask does not tile the {frames}x{height}x{width} latent grid")
    cells = mask.float().view(b, 1, t, height, h // height, width, w // width).amax(dim=(4, 6))
    if frames == 1:
        return cells
    rest = cells[:, :, 1:].view(b, 1, frames - 1, (t - 1) // (frames - 1), height, width).amax(dim=3)
    return torch.cat([cells[:, :, :1], rest], dim=2)


def weighted(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Loss weights from a 0/1 foreground ``mask``: ``weight`` on the foreground, 1 elsewhere."""
    return 1.0 + (weight - 1.0) * mask.float()
