"""Video and image files <-> lists of PIL frames: H.264 mp4 writing through PyAV, reading back.

:func:`save_video` is the seed's ``save_video(frames, path, fps, quality)``: ``quality`` 0..10 uses
imageio's scale for libx264, ``crf = int((1 - quality / 10) * 51)`` (10 -> crf 0, 9 -> 5, 5 -> 25,
0 -> 51; lower crf is better). Frames are stored as yuv420p, which needs even width and height:
odd sizes are padded by one replicated edge row/column (with a warning), not rejected.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .files import atomic_path
from .images import to_rgb

logger = logging.getLogger(__name__)

__all__ = ["load_image", "load_video", "quality_to_crf", "save_video"]


def quality_to_crf(quality: int) -> int:
    """imageio's libx264 mapping of ``quality`` 0 (worst) .. 10 (best) to crf 51 .. 0."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 10:
        raise ValueError(f"quality must be an int from 0 (smallest file) to 10 (best), got {quality!r}")
    return int((1 - quality / 10) * 51)


def _check_frames(frames: Sequence[Image.Image]) -> tuple[int, int]:
    """The common ``(width, height)`` of ``frames``, which must be a non-empty list of PIL images."""
    if isinstance(frames, Image.Image):
        raise TypeError("frames must be a list of PIL images, got a single image")
    if len(frames) == 0:
        raise ValueError("cannot save a video without frames (empty frame list)")
    sizes: dict[tuple[int, int], int] = {}
    for i, frame in enumerate(frames):
        if not isinstance(frame, Image.Image):
            raise TypeError(f"frame {i} is a {type(frame).__name__}, expected a PIL image")
        sizes.setdefault(frame.size, i)
    if len(sizes) > 1:
        described = ", ".join(f"{w}x{h} (first at frame {i})" for (w, h), i in sizes.items())
        raise ValueError(f"all frames must have one size; found {described}")
    return next(iter(sizes))


def _rgb_even(frame: Image.Image, width: int, height: int) -> np.ndarray:
    """``frame`` as an RGB uint8 array of even size, the last row/column repeated where odd."""
    array = np.asarray(to_rgb(frame))
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    return np.pad(array, pad, mode="edge") if height % 2 or width % 2 else array


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 15, quality: int = 9) -> Path:
    """Write ``frames`` as an H.264 (libx264, yuv420p) mp4 at ``path``; returns the path.

    The file is written beside ``path`` under a temporary name and renamed into place, so ``path``
    is either the complete video or untouched (no partial file, no temporary left) on any error.
    Missing parent folders are created.
    """
    crf = quality_to_crf(quality)
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not 0 < fps < float("inf"):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"save_video writes mp4 files; {path} should end in .mp4")
    width, height = _check_frames(frames)
    if width % 2 or height % 2:
        logger.warning("H.264 yuv420p needs even sizes: padding %dx%d frames to %dx%d by repeating the last "
                       "row/column", width, height, width + width % 2, height + height % 2)
    import av  # imported on use: PyAV is only needed for reading and writing video files

    try:
        with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100000),
                                          options={"crf": str(crf)})
            stream.width, stream.height = width + width % 2, height + height % 2
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                video_frame = av.VideoFrame.from_ndarray(_rgb_even(frame, width, height), format="rgb24")
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode())
    except (OSError, av.FFmpegError) as e:  # name the user's path, not the temporary file
        reason = getattr(e, "strerror", None) or str(e)
        raise OSError(f"cannot write {path}: {reason}") from None
    logger.info("saved %d frames (%dx%d, %g fps, crf %d) to %s", len(frames), width, height, fps, crf, path)
    return path


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre crop to the ``width:height`` aspect, then resize (Pillow's default filter), like the
    seed's ``VideoData``; an image already at the size is returned as is."""
    if image.size == (width, height):
        return image
    w, h = image.size
    if h / w < height / width:
        crop_w = int(h / height * width)
        left = (w - crop_w) // 2
        image = image.crop((left, 0, left + crop_w, h))
    else:
        crop_h = int(w / width * height)
        top = (h - crop_h) // 2
        image = image.crop((0, top, w, top + crop_h))
    return image.resize((width, height))


def _target_size(height: int | None, width: int | None) -> tuple[int, int] | None:
    if height is None and width is None:
        return None
    if height is None or width is None:
        raise ValueError(f"give both height and width to resize, or neither; got height={height}, width={width}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return width, height


def load_image(path: str | os.PathLike, height: int | None = None, width: int | None = None) -> Image.Image:
    """An RGB image from ``path``; with ``height`` and ``width``, centre-cropped and resized to them."""
    size = _target_size(height, width)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path.absolute()}")
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for files it cannot decode
        raise ValueError(f"cannot read image {path}: {e}") from None
    return image if size is None else _crop_and_resize(image, *size)


def _single_thread_conversion(av: Any) -> dict[str, int]:
    """Keyword arguments that make PyAV convert each decoded frame to RGB on the calling thread.

    PyAV 17+ starts a pool of conversion threads for every frame by default, which costs 5-15 times
    the conversion itself on small frames (a 17-frame 64x64 clip: 140 ms against 10 ms on two
    cores); older versions convert on one thread and take no such argument."""
    return {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def load_video(path: str | os.PathLike, num_frames: int | None = None, height: int | None = None,
               width: int | None = None) -> list[Image.Image]:
    """The first ``num_frames`` frames (default all) of a video file as RGB PIL images.

    With ``height`` and ``width`` each frame is centre-cropped and resized to them. Asking for more
    frames than the file has is an error naming both counts.
    """
    import av

    size = _target_size(height, width)
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                   or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int or None, got {num_frames!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path.absolute()}")
    frames: list[Image.Image] = []
    convert = _single_thread_conversion(av)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            for frame in container.decode(video=0):
                image = frame.to_image(**convert)
                frames.append(image if size is None else _crop_and_resize(image, *size))
                if num_frames is not None and len(frames) == num_frames:
                    break
    except av.FFmpegError as e:
        raise ValueError(f"cannot read video {path}: {e}") from e
    if not frames:
        raise ValueError(f"{path} holds no decodable video frames")
    if num_frames is not None and len(frames) < num_frames:
        raise ValueError(f"{path} has {len(frames)} frames, fewer than num_frames={num_frames}")
    return frames
