"""save_video / load_video / load_image: H.264 mp4 round trips read back with PyAV, atomic writes, errors."""

from __future__ import annotations

import logging

import av
import numpy as np
import pytest
from PIL import Image

from wan_runtime.video_io import load_image, load_video, quality_to_crf, save_video

# H.264 at crf 5 (quality 9) with 4:2:0 chroma on smooth test frames: per-frame mean error stays
# within a few levels, single pixels (chroma edges) within a few tens.
MEAN_TOLERANCE = 4.0
MAX_TOLERANCE = 40


def gradient_frames(n: int = 9, width: int = 64, height: int = 48) -> list[Image.Image]:
    """Smooth frames (horizontal red ramp, vertical blue ramp, green changing over time)."""
    frames = []
    for t in range(n):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 0] = np.linspace(0, 255, width)[None, :]
        pixels[..., 1] = 20 + 25 * t
        pixels[..., 2] = np.linspace(255, 0, height)[:, None]
        frames.append(Image.fromarray(pixels))
    return frames


def read_back(path) -> tuple[list[np.ndarray], av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream


def errors(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max())


# ---------------------------------------------------------------- writing


def test_round_trip_frames_size_codec_and_pixels(tmp_path):
    frames = gradient_frames()
    path = save_video(frames, tmp_path / "out.mp4", fps=15)
    assert path == tmp_path / "out.mp4"
    decoded, stream = read_back(path)
    assert len(decoded) == 9
    assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
    assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
    assert stream.average_rate == 15
    for frame, got in zip(frames, decoded):
        mean, worst = errors(np.asarray(frame), got)
        assert mean < MEAN_TOLERANCE and worst < MAX_TOLERANCE, (mean, worst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_fractional_fps_and_rgba_frames(tmp_path):
    frames = [f.convert("RGBA") for f in gradient_frames(3)]
    _, stream = read_back(save_video(frames, tmp_path / "v.mp4", fps=7.5))
    assert stream.average_rate == 7.5


def test_quality_maps_like_imageio_and_lower_quality_is_smaller(tmp_path):
    assert [quality_to_crf(q) for q in (10, 9, 5, 0)] == [0, 5, 25, 51]
    noise = np.random.default_rng(0).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    frames = [Image.fromarray(f) for f in noise]
    best = save_video(frames, tmp_path / "best.mp4", quality=10).stat().st_size
    worst = save_video(frames, tmp_path / "worst.mp4", quality=0).stat().st_size
    assert worst < best


def test_odd_sizes_are_padded_to_even_with_a_warning(tmp_path, caplog):
    frame = Image.new("RGB", (33, 17), (200, 30, 60))
    with caplog.at_level(logging.WARNING, logger="wan_runtime.video_io"):
        decoded, stream = read_back(save_video([frame] * 3, tmp_path / "odd.mp4"))
    assert (stream.codec_context.width, stream.codec_context.height) == (34, 18)
    assert "padding 33x17 frames to 34x18" in caplog.text
    mean, _ = errors(np.full((18, 34, 3), (200, 30, 60), np.uint8), decoded[0])
    assert mean < MEAN_TOLERANCE  # the padding repeats the edge colour


@pytest.mark.parametrize("frames, error, message", [
    ([], ValueError, "empty frame list"),
    ([Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32)), Image.new("RGB", (64, 32))], ValueError,
     r"one size; found 32x32 \(first at frame 0\), 64x32 \(first at frame 2\)"),
    ([Image.new("RGB", (32, 32)), np.zeros((32, 32, 3), np.uint8)], TypeError, "frame 1 is a ndarray"),
    (Image.new("RGB", (32, 32)), TypeError, "got a single image"),
])
def test_bad_frames(tmp_path, frames, error, message):
    with pytest.raises(error, match=message):
        save_video(frames, tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(quality=11), "quality must be an int from 0"),
    (dict(quality=-1), "quality must be an int from 0"),
    (dict(quality=8.5), "quality must be an int from 0"),
    (dict(fps=0), "fps must be a positive number"),
    (dict(path="x.avi"), r"writes mp4 files; .*x.avi should end in .mp4"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    kwargs.setdefault("path", "x.mp4")
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(ValueError, match=message):
        save_video(gradient_frames(2), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"previous video")
    real = av.VideoFrame.from_ndarray
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        save_video(gradient_frames(), target)
    with pytest.raises(RuntimeError, match="simulated"):
        calls.clear()
        save_video(gradient_frames(), tmp_path / "new.mp4")
    assert target.read_bytes() == b"previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_missing_parent_folders_are_created(tmp_path):
    assert save_video(gradient_frames(2), tmp_path / "a" / "b" / "v.mp4").is_file()


# ---------------------------------------------------------------- reading


def test_load_video_all_first_n_and_resized(tmp_path):
    path = save_video(gradient_frames(9, 64, 48), tmp_path / "v.mp4")
    frames = load_video(path)
    assert len(frames) == 9 and frames[0].size == (64, 48) and frames[0].mode == "RGB"
    mean, _ = errors(np.asarray(gradient_frames(1)[0]), np.asarray(frames[0]))
    assert mean < MEAN_TOLERANCE
    assert len(load_video(path, num_frames=5)) == 5
    small = load_video(path, num_frames=2, height=16, width=32)
    assert [f.size for f in small] == [(32, 16)] * 2
    # Centre crop then resize: a 64x48 frame to a square keeps the middle 48 columns.
    square = load_video(path, num_frames=1, height=24, width=24)[0]
    assert square.size == (24, 24)
    red = np.asarray(square)[12, :, 0].astype(int)
    assert 30 < red[0] < 80 and 175 < red[-1] < 225


def test_load_video_gives_the_pixels_of_pyav_default_conversion(tmp_path):
    """load_video converts frames on one thread (fast for small frames): the same pixels as PyAV's
    default conversion, on noisy frames with hard colour edges."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(5)]
    path = save_video(frames, tmp_path / "noise.mp4")
    expected, _ = read_back(path)
    assert all(np.array_equal(np.asarray(got), want) for got, want in zip(load_video(path), expected, strict=True))


def test_load_video_errors(tmp_path):
    path = save_video(gradient_frames(3), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="has 3 frames, fewer than num_frames=5"):
        load_video(path, num_frames=5)
    with pytest.raises(ValueError, match="both height and width"):
        load_video(path, height=16)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        load_video(path, num_frames=0)
    with pytest.raises(FileNotFoundError, match="video file not found"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        load_video(tmp_path / "junk.mp4")


def test_load_image_converts_to_rgb_and_resizes(tmp_path):
    Image.new("RGBA", (40, 20), (10, 20, 30, 128)).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (40, 20) and image.getpixel((0, 0)) == (10, 20, 30)
    assert load_image(tmp_path / "a.png", height=10, width=10).size == (10, 10)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "b.png")
