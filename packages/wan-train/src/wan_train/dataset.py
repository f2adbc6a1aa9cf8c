"""The training data: a folder of videos/images described by a metadata file, as the seed reads it.

``metadata.csv`` has a ``video`` (or ``image``) column with file names relative to the base folder,
a ``prompt`` column and one column per ``--extra_inputs`` entry that does not come from the video
itself. Columns in ``--data_file_keys`` are loaded from files: videos (mp4 avi mov wmv mkv flv
webm) as their first ``num_frames`` frames, images (jpg jpeg png webp) as one-frame videos.

Frames are resized so that they cover the target size and centre-cropped to it (the seed's order:
resize, then crop). The target is ``--height x --width``, or with both empty the frame's own size
scaled down to at most ``--max_pixels`` and rounded down to multiples of 16.

:meth:`VideoDataset.check` opens every file once before training, so that a missing column, a
missing, unreadable or too short file is an error naming the file, not a crash hours later. The
metadata is checked as it is read: UTF-8 text, as many fields in every row as in the header, and no
field running on over lines that look like rows of their own (an unterminated quote).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import av
import torch
from PIL import Image
from tqdm import tqdm

from wan_runtime.images import to_rgb
from wan_runtime.video_io import load_video

from .args import FRAMES_INPUTS, IMAGE_INPUTS, NUMBER_INPUTS, TrainingError, split_list

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "VideoDataset", "crop_and_resize", "first_item", "target_size",
           "video_dataset"]

VIDEO_EXTENSIONS = ("mp4", "avi", "mov", "wmv", "mkv", "flv", "webm")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TARGET_KEYS = ("video", "image")  # the column holding what the model learns to generate, first found
SIZE_FACTOR = 16  # VAE factor 8 x DiT patch 2


def first_item(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for batches of one sample: the sample itself (frames stay PIL)."""
    return batch[0]


def _suffix(path: str | Path) -> str:
    return Path(path).suffix.lower().lstrip(".")


def target_size(width: int, height: int, max_pixels: int, fixed: tuple[int, int] | None,
                factor: int = SIZE_FACTOR) -> tuple[int, int]:
    """``(width, height)`` frames are brought to: ``fixed``, or the own size capped at ``max_pixels``
    (aspect kept) and rounded down to multiples of ``factor`` (16; 32 for TI2V-5B's 16x VAE)."""
    if fixed is not None:
        return fixed
    if width * height > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        width, height = int(width / scale), int(height / scale)
    return width // factor * factor, height // factor * factor


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` (bilinear) until it covers ``width x height``, then crop the centre to that size."""
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = round(w * scale), round(h * scale)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if (new_w, new_h) == (width, height):
        return image
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _read_text(path: Path, expected: str = "the metadata must be a UTF-8 text file (CSV or JSON)") -> str:
    """The file as text: UTF-8 (a BOM is dropped), no NUL characters; else an error saying ``expected``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrainingError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TrainingError(f"{path} line {line}: byte {data[e.start:e.start + 1]!r} is not UTF-8 text; "
                            f"{expected}") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise TrainingError(f"{path} line {line}: contains a NUL character, so it is not a text file (UTF-16?); "
                            f"{expected}")
    return text


def _looks_like_row(line: str, file_columns: list[int]) -> bool:
    """Whether ``line`` parses as a metadata row: two fields or more, a video/image file name in a file column."""
    fields = next(csv.reader([line]), [])
    media = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    return len(fields) >= 2 and any(i < len(fields) and _suffix(fields[i].strip()) in media for i in file_columns)


def _read_csv(path: Path, file_keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a metadata CSV, each checked: as many fields as the header, no other row swallowed."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    rows: list[dict[str, Any]] = []
    try:
        header = next(reader, [])
        file_columns = [i for i, name in enumerate(header) if name in file_keys]
        end = reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:  # a blank line
                continue
            where = f"{path} row {len(rows) + 1} (line {start})"
            if len(fields) != len(header):
                hint = ("quote fields that contain a comma" if len(fields) > len(header)
                        else f"no {header[len(fields):]}")
                raise TrainingError(f"{where}: {len(fields)} field{'s' * (len(fields) != 1)}, the header has "
                                    f"{len(header)}; {hint}")
            for name, value in zip(header, fields):
                swallowed = next((text for text in value.splitlines()[1:] if _looks_like_row(text, file_columns)),
                                 None)
                if swallowed is not None:
                    raise TrainingError(f"{where} column {name!r} runs over several lines, one of which looks like "
                                        f"a row of its own: {swallowed[:80]!r}; a quote is probably unterminated")
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise TrainingError(f"{path} line {reader.line_num}: {e}; a quote is probably unterminated") from None
    return rows


def _read_metadata(base: Path, metadata_path: str | None,
                   file_keys: Sequence[str] = ("image", "video")) -> tuple[list[dict[str, Any]], str]:
    """Rows (dicts) of the metadata file, or generated from ``name.ext`` + ``name.txt`` pairs; and where from."""
    if metadata_path is None:
        rows = []
        media = sorted(p for p in base.iterdir() if _suffix(p) in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
        for path in media:
            prompt = path.with_suffix(".txt")
            if prompt.is_file():
                text = _read_text(prompt, "prompt files must be UTF-8 text")
                rows.append({"video": path.name, "prompt": text.strip()})
        if not rows:
            raise TrainingError(f"no --dataset_metadata_path given and {base} holds no video/image with a same-named "
                                ".txt prompt beside it; write a metadata.csv with video and prompt columns")
        return rows, f"{base} (video/image + .txt pairs)"
    path = Path(metadata_path)
    if not path.is_file():
        raise TrainingError(f"metadata file not found: {path.absolute()}")
    if _suffix(path) == "json":
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise TrainingError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise TrainingError(f"{path}: expected a JSON list of objects, one per sample")
    else:
        rows = _read_csv(path, file_keys)
    if not rows:
        raise TrainingError(f"{path} lists no samples")
    return rows, str(path)


class VideoDataset(torch.utils.data.Dataset):
    """Samples ``{"video": [PIL frames], "prompt": str, <extra columns>, "index": int}``.

    ``len`` is ``repeat`` times the number of rows; index ``i`` is row ``i % rows``. Loading (file
    decoding, resizing) happens in ``__getitem__``, i.e. in the DataLoader's worker processes.
    """

    def __init__(self, base_path: str, metadata_path: str | None = None, num_frames: int = 81,
                 height: int | None = None, width: int | None = None, max_pixels: int = 1280 * 720,
                 data_file_keys: Sequence[str] = ("image", "video"), repeat: int = 1,
                 extra_inputs: Sequence[str] = ()) -> None:
        self.base = Path(base_path)
        if not self.base.is_dir():
            raise TrainingError(f"--dataset_base_path {self.base.absolute()} is not a folder")
        self.file_keys = list(data_file_keys)
        self.rows, self.source = _read_metadata(self.base, metadata_path, self.file_keys)
        self.num_frames = num_frames
        self.fixed_size = None if height is None else (width, height)
        self.size_factor = SIZE_FACTOR  # pixels per DiT token; the trainer sets the loaded model's
        self.max_pixels = max_pixels
        self.repeat = repeat
        self.extra_inputs = list(extra_inputs)
        self.target = self._check_columns()

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    # -- checks -----------------------------------------------------------------------------------

    def _check_columns(self) -> str:
        """The target column; every column the flags need must be in the metadata's first row's keys."""
        columns = set(self.rows[0])
        target = next((key for key in TARGET_KEYS if key in columns and key in self.file_keys), None)
        if target is None:
            raise TrainingError(f"{self.source} has columns {sorted(columns)}: it needs a 'video' (or 'image') column "
                                f"listed in --data_file_keys ({','.join(self.file_keys)})")
        needed = ["prompt"] + [name for name in self.extra_inputs if name not in ("input_image", "end_image")]
        missing = [name for name in needed if name not in columns]
        if missing:
            raise TrainingError(f"{self.source} has no column {missing} (columns: {sorted(columns)}); "
                                "--extra_inputs other than input_image/end_image are read from metadata columns")
        not_files = [name for name in self.extra_inputs
                     if name in FRAMES_INPUTS + IMAGE_INPUTS and name not in self.file_keys]
        if not_files:
            raise TrainingError(f"--extra_inputs {not_files} are files: add them to --data_file_keys "
                                f"(now {','.join(self.file_keys)})")
        for i, row in enumerate(self.rows):
            empty = [name for name in [target, *needed] if row.get(name) in (None, "")]
            if empty:
                raise TrainingError(f"{self.source} row {i + 1}: empty or missing {empty}")
        return target

    def check(self, show_progress: bool = True) -> None:
        """Open every file once: it must exist, be readable and (videos) have ``num_frames`` frames."""
        for i, row in enumerate(tqdm(self.rows, desc="checking dataset", disable=not show_progress, leave=False)):
            for key in self.file_keys:
                if key in row and row[key] not in (None, ""):
                    self._check_file(self.base / str(row[key]), f"{self.source} row {i + 1} column {key!r}")
            for name, kind in NUMBER_INPUTS.items():
                if name in self.extra_inputs:
                    try:
                        kind(row[name])
                    except ValueError:
                        raise TrainingError(f"{self.source} row {i + 1} column {name!r}: {row[name]!r} is not "
                                            f"a{'n integer' if kind is int else ' number'}") from None
        logger.info("dataset: %d samples from %s, each seen %d times per epoch", len(self.rows), self.source,
                    self.repeat)

    def fit_model(self, pipeline: Any) -> None:
        """Bring the dataset to the loaded model: frame sizes rounded to its pixels per DiT token, and
        (TI2V-5B with ``input_image``) :meth:`check_first_frame_condition`."""
        self.size_factor = pipeline.shape_multiples[0]
        if pipeline.dit.config.fuses_image_latents and "input_image" in self.extra_inputs:
            self.check_first_frame_condition()

    def check_first_frame_condition(self) -> None:
        """For a DiT that holds the input image as latent frame 0 (TI2V-5B with ``input_image``): every
        sample needs a latent frame after it, so images and ``--num_frames 1`` are refused, naming them."""
        if self.num_frames < 5:
            raise TrainingError(f"--num_frames {self.num_frames}: with input_image the first latent frame is the "
                                "image itself and the loss leaves it out; train on at least 5 frames")
        stills = [f"row {i + 1} ({row[self.target]})" for i, row in enumerate(self.rows)
                  if _suffix(str(row[self.target])) in IMAGE_EXTENSIONS]
        if stills:
            raise TrainingError(f"{self.source}: {', '.join(stills[:5])}: image(s), not videos. With input_image"
                                " the first frame's latent frame is held and left out of the loss, so a "
                                "still leaves nothing to learn; keep videos only, or drop input_image (text-to-video)")

    def _check_file(self, path: Path, where: str) -> None:
        if not path.is_file():
            raise TrainingError(f"{where}: file not found: {path.absolute()}")
        suffix = _suffix(path)
        if suffix in IMAGE_EXTENSIONS:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as e:  # PIL raises many types for broken files
                raise TrainingError(f"{where}: cannot read image {path}: {e}") from None
        elif suffix in VIDEO_EXTENSIONS:
            frames = _count_frames(path, self.num_frames, where)
            if frames < self.num_frames:
                raise TrainingError(f"{where}: video {path} has {frames} frames, fewer than --num_frames "
                                    f"{self.num_frames}; drop it, use a longer clip or lower --num_frames (4k+1)")
        else:
            raise TrainingError(f"{where}: {path.name} is neither a video ({', '.join(VIDEO_EXTENSIONS)}) nor an "
                                f"image ({', '.join(IMAGE_EXTENSIONS)})")

    # -- loading ----------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index % len(self.rows)]
        sample: dict[str, Any] = {key: value for key, value in row.items() if key not in self.file_keys}
        target = self._frames(self.base / str(row[self.target]), None)
        size = target[0].size
        sample["video"] = target
        for key in self.file_keys:
            if key != self.target and row.get(key) not in (None, ""):
                frames = self._frames(self.base / str(row[key]), size)
                sample[key] = frames[0] if key in IMAGE_INPUTS else frames
        for name, kind in NUMBER_INPUTS.items():
            if name in sample and name in self.extra_inputs:
                sample[name] = kind(sample[name])
        sample["index"] = index
        return sample

    def _frames(self, path: Path, size: tuple[int, int] | None) -> list[Image.Image]:
        """The file's frames at ``size``, or (``None``) at the target size of its first frame."""
        if _suffix(path) in IMAGE_EXTENSIONS:
            with Image.open(path) as image:
                frames = [to_rgb(image)]
        else:
            try:
                frames = load_video(path, self.num_frames)
            except ValueError as e:
                raise TrainingError(f"{path}: {e}") from None
        if size is None:
            size = target_size(*frames[0].size, self.max_pixels, self.fixed_size, self.size_factor)
            if min(size) < self.size_factor:
                raise TrainingError(f"{path}: frames of {frames[0].size[0]}x{frames[0].size[1]} are too small for "
                                    f"--max_pixels {self.max_pixels} (need at least {self.size_factor}x"
                                    f"{self.size_factor} after scaling)")
        return [crop_and_resize(frame, *size) for frame in frames]


def _count_frames(path: Path, needed: int, where: str) -> int:
    """Frames in the video (decoding at most ``needed`` when the container does not store the count)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TrainingError(f"{where}: {path} has no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            count = 0
            for _ in container.decode(video=0):
                count += 1
                if count >= needed:
                    break
            return count
    except av.FFmpegError as e:
        raise TrainingError(f"{where}: cannot read video {path}: {e}") from None


def video_dataset(args: argparse.Namespace, repeat: int, show_progress: bool = True) -> VideoDataset:
    """The :class:`VideoDataset` the dataset flags describe, every file checked."""
    dataset = VideoDataset(args.dataset_base_path, args.dataset_metadata_path, num_frames=args.num_frames,
                           height=args.height, width=args.width, max_pixels=args.max_pixels,
                           data_file_keys=split_list(args.data_file_keys), repeat=repeat,
                           extra_inputs=split_list(args.extra_inputs))
    dataset.check(show_progress)
    return dataset
