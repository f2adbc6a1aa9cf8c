"""What a clip shows: the colour, motion direction and (best effort) shape of its one moving blob.

Plain numpy, meant for imperfect generated videos: frames are box-blurred (noise), the background
colour is the median of the border pixels (robust to the blob touching the border), the foreground
is every pixel far from it, with a threshold that adapts to the background's own spread and the
blob's contrast, and the blob's position per frame is the mean of the foreground pixels near their
median (stray specks elsewhere do not pull it). Colour is named by the nearest palette colour in
CIELAB; direction comes from a Theil-Sen fit of the positions over time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image

from .vocab import COLORS

logger = logging.getLogger(__name__)

Frame = Union[Image.Image, np.ndarray]

BORDER = 2               # border width (pixels) whose median is the background colour
MIN_CONTRAST = 40.0      # a blob must differ from the background by this much (RGB distance) to count
MIN_PIXELS = 4           # foreground pixels a frame needs for a position
STILL_FRACTION = 0.06    # net motion below this fraction of the frame side is "still"
FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure_clip` found; ``None`` fields mean "no blob" (or, for direction, too few frames).

    ``dx``/``dy`` are the net displacement over the clip in pixels (y grows downwards), ``fill_ratio``
    the blob's area over its bounding box (circle ~0.79, square ~1, triangle ~0.5).
    """

    color: str | None
    rgb: tuple[float, float, float] | None
    direction: str | None
    dx: float
    dy: float
    shape: str | None
    fill_ratio: float | None
    frames_found: int


def to_array(frames: Sequence[Frame]) -> np.ndarray:
    """``frames`` (PIL images or HxWx3 arrays, uint8 or float 0..255) as a float32 ``(T, H, W, 3)`` array."""
    arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, dtype=np.float32) for f in frames]
    if not arrays:
        raise ValueError("no frames to measure")
    out = np.stack(arrays)
    if out.ndim != 4 or out.shape[-1] != 3:
        raise ValueError(f"frames must be HxWx3 RGB, got a stack of shape {out.shape}")
    return out


def _box_blur(video: np.ndarray) -> np.ndarray:
    """3x3 mean over each frame (edges replicated): cuts per-pixel noise three-fold."""
    padded = np.pad(video, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = video.shape[1:3]
    return sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """How many of the 3x3 pixels around each pixel (itself included) are set."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:3]
    return sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3))


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, last axis) to CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def nearest_color(rgb: Sequence[float], palette: Mapping[str, Sequence[int]] = COLORS) -> str:
    """The palette name closest to ``rgb`` in CIELAB."""
    names = list(palette)
    distances = np.linalg.norm(rgb_to_lab(np.array([palette[n] for n in names])) - rgb_to_lab(np.asarray(rgb)), axis=-1)
    return names[int(np.argmin(distances))]


def _theil_sen(t: np.ndarray, v: np.ndarray) -> float:
    """Median of the pairwise slopes of ``v`` over ``t``: a line fit that ignores a few wild points."""
    i, j = np.triu_indices(len(t), k=1)
    return float(np.median((v[j] - v[i]) / (t[j] - t[i])))


def _direction(dx: float, dy: float, min_move: float) -> str:
    if np.hypot(dx, dy) < min_move:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _shape(fill_ratio: float) -> str:
    return min(FILL_RATIOS, key=lambda name: abs(FILL_RATIOS[name] - fill_ratio))


def measure_clip(frames: Sequence[Frame], palette: Mapping[str, Sequence[int]] = COLORS,
                 still_fraction: float = STILL_FRACTION) -> Measurement:
    """Colour, direction and shape of the one blob that differs from the background in ``frames``."""
    video = to_array(frames)
    smooth = _box_blur(video)
    frame_count, height, width = video.shape[:3]
    border = np.concatenate([smooth[:, :BORDER].reshape(-1, 3), smooth[:, -BORDER:].reshape(-1, 3),
                             smooth[:, :, :BORDER].reshape(-1, 3), smooth[:, :, -BORDER:].reshape(-1, 3)])
    ground = np.median(border, axis=0)
    distance = np.linalg.norm(smooth - ground, axis=-1)
    spread = float(np.percentile(np.linalg.norm(border - ground, axis=-1), 90))
    contrast = float(np.percentile(distance, 99.5))
    none = Measurement(None, None, None, 0.0, 0.0, None, None, 0)
    if contrast < max(MIN_CONTRAST, 1.5 * spread + 20):
        logger.debug("no blob: contrast %.1f against background spread %.1f", contrast, spread)
        return none
    threshold = min(2 * spread + 12, 0.6 * contrast)
    mask = distance > threshold
    mask &= _neighbours(mask) >= 4  # drop specks and one-pixel lines

    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    times, xs, ys, fills = [], [], [], []
    colour_pixels = []
    for t in range(frame_count):
        found = mask[t]
        count = int(found.sum())
        if count < MIN_PIXELS:
            continue
        x0, y0 = np.median(cols[found]), np.median(rows[found])
        reach = 2.2 * np.sqrt(count / np.pi) + 2
        blob = found & ((cols - x0) ** 2 + (rows - y0) ** 2 <= reach ** 2)
        if blob.sum() < MIN_PIXELS:
            continue
        times.append(t)
        xs.append(float(cols[blob].mean()))
        ys.append(float(rows[blob].mean()))
        level = distance[t][blob]
        colour_pixels.append(video[t][blob & (distance[t] >= np.median(level))])
        half = blob & (distance[t] > 0.5 * np.percentile(level, 90))  # the 50%-coverage outline
        if half.any():
            hy, hx = np.nonzero(half)
            fills.append(half.sum() / ((hy.max() - hy.min() + 1) * (hx.max() - hx.min() + 1)))
    if not times:
        return none
    rgb = np.concatenate(colour_pixels).mean(axis=0)
    fill_ratio = float(np.median(fills)) if fills else None
    shape = _shape(fill_ratio) if fill_ratio is not None else None
    color = nearest_color(rgb, palette)
    if len(times) < 2:
        return Measurement(color, tuple(map(float, rgb)), None, 0.0, 0.0, shape, fill_ratio, len(times))
    t = np.asarray(times, dtype=np.float64)
    dx = _theil_sen(t, np.asarray(xs)) * (frame_count - 1)
    dy = _theil_sen(t, np.asarray(ys)) * (frame_count - 1)
    direction = _direction(dx, dy, still_fraction * min(height, width))
    return Measurement(color, tuple(map(float, rgb)), direction, dx, dy, shape, fill_ratio, len(times))
