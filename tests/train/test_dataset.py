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


# -- metadata files that are not what they seem: each an error naming the file and the line or row ----------


def _metadata(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "metadata.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def test_metadata_must_be_utf8_text(dataset: Path, tmp_path: Path) -> None:
    expected = "the metadata must be a UTF-8 text file \\(CSV or JSON\\)"
    binary = _metadata(tmp_path, (dataset / "still.png").read_bytes())  # a picture saved as metadata.csv
    with pytest.raises(TrainingError, match=rf"metadata\.csv line 1: byte b'\\x89' is not UTF-8 text; {expected}"):
        VideoDataset(str(dataset), str(binary))
    latin1 = _metadata(tmp_path, "video,prompt\nclip0.mp4,a square\nclip1.mp4,un carré\n".encode("latin-1"))
    with pytest.raises(TrainingError, match=rf"line 3: byte b'\\xe9' is not UTF-8 text; {expected}"):
        VideoDataset(str(dataset), str(latin1))
    utf16 = _metadata(tmp_path, "video,prompt\nclip0.mp4,a square\n".encode("utf-16"))  # Excel's "Unicode text"
    with pytest.raises(TrainingError, match=rf"line 1: byte b'\\xff' is not UTF-8 text; {expected}"):
        VideoDataset(str(dataset), str(utf16))
    nul = _metadata(tmp_path, "video,prompt\nclip0.mp4,a square\nclip1.mp4,a\0 square\n")
    with pytest.raises(TrainingError, match=rf"line 3: contains a NUL character, so it is not a text file"):
        VideoDataset(str(dataset), str(nul))
    json_file = tmp_path / "metadata.json"
    json_file.write_bytes(b'[{"video": "clip0.mp4", "prompt": "\xff"}]')
    with pytest.raises(TrainingError, match=rf"metadata\.json line 1: byte b'\\xff' is not UTF-8 text"):
        VideoDataset(str(dataset), str(json_file))
    # A UTF-8 BOM (Excel's "CSV UTF-8") is fine.
    bom = _metadata(tmp_path, "\ufeffvideo,prompt\nclip0.mp4,a square\n")
    assert VideoDataset(str(dataset), str(bom)).rows == [{"video": "clip0.mp4", "prompt": "a square"}]


def test_unterminated_quote_is_found(dataset: Path, tmp_path: Path) -> None:
    """The quote opened in row 1 runs to the end of the file: csv reads one sample whose prompt holds the
    other rows. That is an error naming the row and quoting the swallowed line."""
    merged = _metadata(tmp_path, 'video,prompt\nclip0.mp4,"a red square\nclip1.mp4,a green square\n'
                                 'clip2.mp4,a blue box\n')
    with pytest.raises(TrainingError, match=r"metadata\.csv row 1 \(line 2\) column 'prompt' runs over several lines, "
                                            r"one of which looks like a row of its own: 'clip1\.mp4,a green square'; "
                                            r"a quote is probably unterminated"):
        VideoDataset(str(dataset), str(merged))
    # ...also when it ends at a later quote, in a later row, with the file column not the first.
    later = _metadata(tmp_path, 'prompt,video\n"a red\nsquare",clip0.mp4\n"a ""green"" square,clip1.mp4\n'
                                'a blue box,clip2.mp4\n"a still picture",still.png\n')
    with pytest.raises(TrainingError, match=r"row 2 \(line 4\) column 'prompt' .* of its own: 'a blue box,clip2\.mp4'"):
        VideoDataset(str(dataset), str(later))
    # Prompts that really run over lines are kept, commas and all.
    fine = _metadata(tmp_path, 'video,prompt\nclip0.mp4,"a red square,\nthen a dog, running"\nclip1.mp4,x\n')
    assert VideoDataset(str(dataset), str(fine)).rows[0]["prompt"] == "a red square,\nthen a dog, running"


def test_csv_errors_name_the_line(dataset: Path, tmp_path: Path) -> None:
    """An unterminated quote near the top of a long file: a field over csv's size limit."""
    text = "video,prompt\nclip0.mp4,x\n" + 'clip1.mp4,"a green square\n' + "".join(
        f"a prompt of row {i}\n" for i in range(8000))
    with pytest.raises(TrainingError, match=r"metadata\.csv line \d+: field larger than field limit \(131072\); "
                                            r"a quote is probably unterminated"):
        VideoDataset(str(dataset), str(_metadata(tmp_path, text)))


def test_rows_must_match_the_header(dataset: Path, tmp_path: Path) -> None:
    more = _metadata(tmp_path, "video,prompt\nclip0.mp4,a square\n\nclip1.mp4,a red, square\n")
    with pytest.raises(TrainingError, match=r"metadata\.csv row 2 \(line 4\): 3 fields, the header has 2; quote "
                                            r"fields that contain a comma"):
        VideoDataset(str(dataset), str(more))
    fewer = _metadata(tmp_path, "video,prompt,control_video\nclip0.mp4,a square,clip1.mp4\nclip1.mp4\n")
    with pytest.raises(TrainingError, match=r"row 2 \(line 3\): 1 field, the header has 3; no \['prompt', "
                                            r"'control_video'\]"):
        VideoDataset(str(dataset), str(fewer))


def test_16_bit_greyscale_png_keeps_its_levels(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG (0..65535) loads scaled to 0..255, not clipped to white by convert("RGB")."""
    levels = np.array([0, 257, 32896, 65535], dtype=np.uint16)  # -> 0, 1, 128, 255
    pixels = np.repeat(np.repeat(levels, WIDTH // 4)[None, :], HEIGHT, axis=0)
    Image.frombytes("I;16", (WIDTH, HEIGHT), pixels.astype("<u2").tobytes()).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:  # a real 16-bit PNG, read back with its levels
        assert image.mode in ("I", "I;16") and np.array_equal(np.asarray(image), pixels)
    write_csv(tmp_path / "m.csv", [{"video": "deep.png", "prompt": "grey bars"}])
    data = VideoDataset(str(tmp_path), str(tmp_path / "m.csv"), num_frames=1, height=HEIGHT, width=WIDTH)
    data.check(show_progress=False)
    frame = np.asarray(data[0]["video"][0])
    assert frame.shape == (HEIGHT, WIDTH, 3)
    assert (frame == np.repeat(np.array([0, 1, 128, 255], dtype=np.uint8), WIDTH // 4)[None, :, None]).all()
