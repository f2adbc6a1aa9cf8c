"""Sampling clip specs from a seed and writing a training folder: ``videos/NNNNN.mp4`` + ``metadata.csv``.

Clip ``i`` of seed ``s`` depends only on ``(s, i)``, so a folder is the same whatever the count,
the worker count or the machine, and its first clips are those of any larger folder of that seed.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from wan_runtime.video_io import save_video

from .render import ClipSpec, motion_step, render_clip
from .vocab import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, prompt_for

logger = logging.getLogger(__name__)

METADATA_COLUMNS = ("video", "prompt", "shape", "color", "direction", "background")
EXTENT_RANGE = (0.25, 0.40)   # shape box side, fraction of the frame
TRAVEL_RANGE = (0.25, 0.45)   # distance covered over the clip, fraction of the frame
MARGIN = 0.03                 # minimum gap between the shape and the frame edge, fraction of the frame
PLACEMENT_JITTER = 0.08       # the path's midpoint lies this close to the frame centre, fraction of the frame
COLOR_JITTER = 10             # +- per channel around the named colour
FPS = 16                      # Wan 2.1's frame rate
QUALITY = 9                   # save_video quality: crf 5, visually lossless


def sample_spec(rng: np.random.Generator, frames: int = 17, size: int = 64,
                backgrounds: Sequence[str] = tuple(BACKGROUNDS)) -> ClipSpec:
    """One random clip: words uniform, shape inside the frame (with a margin) in every frame, its path
    centred near the middle of the frame (so a prompt implies roughly where the shape is and goes: a
    tiny model learns colour and motion from a few thousand clips, not a uniform spread of places)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    ground = backgrounds[rng.integers(len(backgrounds))]
    extent = float(rng.uniform(*EXTENT_RANGE)) * size
    margin = max(1.0, MARGIN * size)
    low, high = margin + extent / 2, size - margin - extent / 2
    travel = 0.0 if direction == "still" else min(float(rng.uniform(*TRAVEL_RANGE)) * size, high - low)
    step = motion_step(direction, travel, frames)
    start = []
    for move in step:  # x then y: the midpoint near the centre, the whole path inside [low, high]
        span = abs(move) * (frames - 1)
        middle = size / 2 + float(rng.uniform(-PLACEMENT_JITTER, PLACEMENT_JITTER)) * size
        middle = min(max(middle, low + span / 2), high - span / 2)
        start.append(middle - move * (frames - 1) / 2)
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
    rgb = tuple(int(v) for v in np.clip(np.add(COLORS[color], jitter), 0, 255))
    return ClipSpec(shape=shape, color=color, direction=direction, background=ground, rgb=rgb, extent=extent,
                    start=(start[0], start[1]), step=step, frames=frames, size=size,
                    texture_seed=int(rng.integers(2**31)))


def sample_specs(count: int, seed: int = 0, frames: int = 17, size: int = 64,
                 backgrounds: Sequence[str] = tuple(BACKGROUNDS)) -> list[ClipSpec]:
    """Clips ``0 .. count - 1`` of ``seed`` (clip ``i`` seeded by ``(seed, i)`` alone)."""
    unknown = set(backgrounds) - set(BACKGROUNDS)
    if unknown or not backgrounds:
        raise ValueError(f"backgrounds must be some of {', '.join(BACKGROUNDS)}; got {list(backgrounds)}")
    if frames < 2 or size < 16:
        raise ValueError(f"need at least 2 frames of at least 16x16 pixels, got {frames} frames of {size}x{size}")
    return [sample_spec(np.random.default_rng([seed, i]), frames, size, backgrounds)
            for i in range(count)]


def metadata_row(spec: ClipSpec, video: str) -> dict[str, str]:
    """The ``metadata.csv`` row of a clip stored at ``video`` (relative to the dataset folder)."""
    return {"video": video, "prompt": prompt_for(spec.shape, spec.color, spec.direction, spec.background),
            "shape": spec.shape, "color": spec.color, "direction": spec.direction, "background": spec.background}


def _write_clip(job: tuple[ClipSpec, Path]) -> None:
    spec, path = job
    save_video(render_clip(spec), path, fps=FPS, quality=QUALITY)


def write_dataset(out_dir: str | os.PathLike, count: int, seed: int = 0, frames: int = 17, size: int = 64,
                  backgrounds: Sequence[str] = tuple(BACKGROUNDS), workers: int | None = None) -> Path:
    """Write ``count`` clips to ``out_dir/videos/`` and their ``metadata.csv``; returns the csv path.

    Encoding runs in ``workers`` processes (default: one per CPU). Existing files of the same names
    are replaced; an old csv is removed first and the new one written last, so a folder with a csv
    is complete.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = Path(out_dir)
    specs = sample_specs(count, seed, frames, size, backgrounds)
    width = max(5, len(str(count - 1)))
    names = [f"videos/{i:0{width}d}.mp4" for i in range(count)]
    metadata = out / "metadata.csv"
    metadata.unlink(missing_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(spec, out / name) for spec, name in zip(specs, names)]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for job in jobs:
            _write_clip(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_clip, jobs, chunksize=max(1, min(64, count // (4 * workers)))))
    with metadata.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(metadata_row(spec, name) for spec, name in zip(specs, names))
    logger.info("wrote %d clips (%d frames, %dx%d) and %s", count, frames, size, size, metadata)
    return metadata
