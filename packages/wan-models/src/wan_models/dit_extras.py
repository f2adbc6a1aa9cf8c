"""Parts that some DiT variants add around the core blocks: the Fun Control-Camera adapter."""

from __future__ import annotations

import torch
from torch import nn

class CameraResidualBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class CameraAdapter(nn.Module):
    """Plücker camera embedding ``[B, C, F, 8H', 8W']`` -> features added to the patch tokens.

    Each frame is pixel-unshuffled by 8, projected by a patch-sized strided conv and refined by one
    residual block, giving ``[B, dim, F, H'/p, W'/p]``.
    """

    def __init__(self, in_dim: int, dim: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim * 64, dim, kernel_size=patch, stride=patch)
        self.residual_blocks = nn.Sequential(CameraResidualBlock(dim))

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        b, _, f = camera.shape[:3]
        frames = camera.transpose(1, 2).flatten(0, 1)
        out = self.residual_blocks(self.conv(nn.functional.pixel_unshuffle(frames, 8)))
        return out.unflatten(0, (b, f)).transpose(1, 2)
