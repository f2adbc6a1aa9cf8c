"""Conversions between PIL images / frame lists and the ``[-1, 1]`` tensors the networks use.

Pixels map as ``x * 2/255 - 1`` in float32 (masks: ``x / 255``), exactly as the reference
pipeline; resizing uses Pillow's default bicubic filter to ``(width, height)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


# Pillow's own ``convert("RGB")`` clips these modes' values to 0..255 instead of scaling them, so a
# 16-bit greyscale PNG (0..65535) comes out almost white; they are scaled by their real range here.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, scaled by its real bit depth: 16-bit greyscale (modes ``I;16*`` and the
    ``I`` Pillow opens 16-bit PNGs as) maps 0..65535 to 0..255, float greyscale (``F``) 0..1 to 0..255;
    other modes convert as Pillow does."""
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / _WIDE_MODES[image.mode])
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image.convert("RGB")
    grey = Image.fromarray(np.rint(np.clip(pixels, 0, 255)).astype(np.uint8), mode="L")
    return grey.convert("RGB")


def _as_image(image: Image.Image, name: str) -> Image.Image:
    if isinstance(image, (list, tuple)):
        raise TypeError(f"{name} must be one PIL image, got a sequence of {len(image)} items (a video?)")
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL image, got {type(image).__name__}")
    return to_rgb(image)


def resize(image: Image.Image, width: int, height: int, name: str = "image") -> Image.Image:
    """``image`` as RGB at ``width x height`` (Pillow bicubic, as the reference units resize)."""
    image = _as_image(image, name)
    return image if image.size == (width, height) else image.resize((width, height))


def image_to_tensor(image: Image.Image, low: float = -1.0, high: float = 1.0, name: str = "image") -> torch.Tensor:
    """PIL image -> float32 ``[3, H, W]`` scaled from 0..255 to ``[low, high]``."""
    pixels = torch.from_numpy(np.array(_as_image(image, name), dtype=np.float32))
    return (pixels * ((high - low) / 255) + low).permute(2, 0, 1)


def video_to_tensor(frames: Sequence[Image.Image], low: float = -1.0, high: float = 1.0,
                    name: str = "video") -> torch.Tensor:
    """List of PIL frames -> float32 ``[1, 3, T, H, W]``."""
    if isinstance(frames, Image.Image):
        raise TypeError(f"{name} must be a list of frames, got a single image")
    frames = list(frames)
    if not frames:
        raise ValueError(f"{name} has no frames")
    sizes = {f.size for f in frames if isinstance(f, Image.Image)}
    if len(sizes) > 1:
        raise ValueError(f"{name} frames differ in size: {sorted(sizes)}")
    return torch.stack([image_to_tensor(f, low, high, f"{name} frame {i}") for i, f in enumerate(frames)],
                       dim=1).unsqueeze(0)


def tensor_to_frames(video: torch.Tensor) -> list[Image.Image]:
    """``[1, 3, T, H, W]`` in [-1, 1] -> list of 8-bit PIL frames."""
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).clamp(0, 255)
    array = pixels.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(frame) for frame in array]
