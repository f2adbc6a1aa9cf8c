"""The dataset: metadata reading, frames, resize + centre crop, dynamic resolution, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wan_runtime.video_io import load_video
from wan_train import TrainingError, VideoDataset
from wan_train.dataset import crop_and_resize, first_item, target_size

from train.support import FRAMES, HEIGHT, VIDEO_FRAMES, WIDTH, write_csv


def test_frames_sizes_and_order(dataset: Path) -> None:
    data = VideoDataset(str(dataset), str(dataset / "metadata.csv"), num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                        repeat=3)
    data.check(show_progress=False)
    assert len(data) == 12
    sample = data[5]  # row 1, second pass
    assert sample["index"] == 5 and sample["prompt"] == "a green square on a gradient"
    assert len(sample["video"]) == FRAMES and {f.size for f in sample["video"]} == {(WIDTH, HEIGHT)}
    # The first FRAMES frames of the file, resized and cropped.
    decoded = load_video(dataset / "clip1.mp4")
    assert len(decoded) == VIDEO_FRAMES
    for got, frame in zip(sample["video"], decoded[:FRAMES]):
        assert np.array_equal(np.asarray(got), np.asarray(crop_and_resize(frame, WIDTH, HEIGHT)))
    still = data[3]["video"]  # an image is a one-frame video
    assert len(still) == 1 and still[0].size == (WIDTH, HEIGHT)


def test_crop_and_resize_keeps_the_centre() -> None:
    """100x50 red|blue -> covers 32x32 at 64x32 -> the centre 32 columns: 16 red, 16 blue."""
    array = np.zeros((50, 100, 3), dtype=np.uint8)
    array[:, :50, 0] = 255
    array[:, 50:, 2] = 255
    out = np.asarray(crop_and_resize(Image.fromarray(array), 32, 32)).astype(int)
    assert out.shape == (32, 32, 3)
    assert (out[:, :15, 0] == 255).all() and (out[:, :15, 2] == 0).all()
    assert (out[:, 17:, 2] == 255).all() and (out[:, 17:, 0] == 0).all()


def test_dynamic_resolution(dataset: Path) -> None:
    assert target_size(56, 40, 1280 * 720, None) == (48, 32)  # own size, rounded down to 16
    assert target_size(1920, 1080, 1280 * 720, None) == (1280, 720)  # capped, aspect kept
    assert target_size(56, 40, 1000, None) == (32, 16)  # 56x40 -> 37x26 -> multiples of 16
    assert target_size(56, 40, 1000, (48, 32)) == (48, 32)
    data = VideoDataset(str(dataset), str(dataset / "metadata.csv"), num_frames=FRAMES)
    assert {f.size for f in data[0]["video"]} == {(48, 32)}  # clip: 56x40
    assert data[3]["video"][0].size == (48, 32)  # still.png: 50x36


def test_folder_without_metadata(tmp_path: Path, dataset: Path) -> None:
    """No metadata file: every video/image with a same-named .txt prompt."""
    for name in ("clip0.mp4", "still.jpg"):
        (tmp_path / name).write_bytes((dataset / name).read_bytes())
    (tmp_path / "clip0.txt").write_text("a square\n")
    (tmp_path / "still.txt").write_text("a picture")
    (tmp_path / "orphan.png").write_bytes((dataset / "still.png").read_bytes())  # no prompt: skipped
    data = VideoDataset(str(tmp_path), None, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    data.check(show_progress=False)
    assert [(row["video"], row["prompt"]) for row in data.rows] == [("clip0.mp4", "a square"),
                                                                    ("still.jpg", "a picture")]


def test_decoding_in_workers(dataset: Path) -> None:
    data = VideoDataset(str(dataset), str(dataset / "metadata.csv"), num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=first_item, num_workers=2)
    samples = list(loader)
    assert [s["index"] for s in samples] == [0, 1, 2, 3]
    assert np.array_equal(np.asarray(samples[2]["video"][4]), np.asarray(data[2]["video"][4]))


def test_extra_columns(dataset: Path, tmp_path: Path) -> None:
    """File columns are loaded at the video's size (images as one image), numbers converted."""
    rows = [{"video": "clip0.mp4", "prompt": "p", "control_video": "clip1.mp4", "reference_image": "still.png",
             "motion_bucket_id": "40"}]
    write_csv(tmp_path / "m.csv", rows)
    data = VideoDataset(str(dataset), str(tmp_path / "m.csv"), num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                        data_file_keys=["video", "control_video", "reference_image"],
                        extra_inputs=["input_image", "control_video", "reference_image", "motion_bucket_id"])
    data.check(show_progress=False)
    sample = data[0]
    assert len(sample["control_video"]) == FRAMES and sample["control_video"][0].size == (WIDTH, HEIGHT)
    assert isinstance(sample["reference_image"], Image.Image) and sample["reference_image"].size == (WIDTH, HEIGHT)
    assert sample["motion_bucket_id"] == 40


# -- bad input: each an error naming what is wrong, raised by the up-front check ---------------------------


def _dataset(base: Path, rows: list[dict], tmp_path: Path, **kwargs) -> VideoDataset:
    write_csv(tmp_path / "bad.csv", rows)
    data = VideoDataset(str(base), str(tmp_path / "bad.csv"), **{"num_frames": FRAMES, "height": HEIGHT,
                                                                 "width": WIDTH, **kwargs})
    data.check(show_progress=False)
    return data


def test_missing_column(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"has no column \['prompt'\]"):
        _dataset(dataset, [{"video": "clip0.mp4", "caption": "x"}], tmp_path)
    with pytest.raises(TrainingError, match="needs a 'video' \\(or 'image'\\) column"):
        _dataset(dataset, [{"clip": "clip0.mp4", "prompt": "x"}], tmp_path)
    with pytest.raises(TrainingError, match=r"has no column \['control_video'\]"):
        _dataset(dataset, [{"video": "clip0.mp4", "prompt": "x"}], tmp_path, extra_inputs=["control_video"],
                 data_file_keys=["video", "control_video"])
    with pytest.raises(TrainingError, match=r"--extra_inputs \['control_video'\] are files: add them to --data_file"):
        _dataset(dataset, [{"video": "clip0.mp4", "prompt": "x", "control_video": "clip1.mp4"}], tmp_path,
                 extra_inputs=["control_video"])
    with pytest.raises(TrainingError, match=r"row 2: empty or missing \['prompt'\]"):
        _dataset(dataset, [{"video": "clip0.mp4", "prompt": "x"}, {"video": "clip1.mp4", "prompt": ""}], tmp_path)


def test_missing_file(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"row 2 column 'video': file not found: .*gone\.mp4"):
        _dataset(dataset, [{"video": "clip0.mp4", "prompt": "x"}, {"video": "gone.mp4", "prompt": "y"}], tmp_path)
    with pytest.raises(TrainingError, match="metadata file not found"):
        VideoDataset(str(dataset), str(tmp_path / "none.csv"))


def test_short_video(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=rf"clip0\.mp4 has {VIDEO_FRAMES} frames, fewer than --num_frames 9"):
        _dataset(dataset, [{"video": "clip0.mp4", "prompt": "x"}], tmp_path, num_frames=9)


def test_unreadable_files(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 100)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TrainingError, match=r"cannot read video .*broken\.mp4"):
        _dataset(tmp_path, [{"video": "broken.mp4", "prompt": "x"}], tmp_path)
    with pytest.raises(TrainingError, match=r"cannot read image .*broken\.png"):
        _dataset(tmp_path, [{"video": "broken.png", "prompt": "x"}], tmp_path)
    with pytest.raises(TrainingError, match="notes.txt is neither a video"):
        _dataset(tmp_path, [{"video": "notes.txt", "prompt": "x"}], tmp_path)


def test_bad_number_column(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="column 'motion_bucket_id': 'fast' is not an integer"):
        _dataset(dataset, [{"video": "clip0.mp4", "prompt": "x", "motion_bucket_id": "fast"}], tmp_path,
                 extra_inputs=["motion_bucket_id"])
