"""Shared set-up of the wan-train tests: a tiny random T2V release and a tiny dataset on disk.

The dataset is real files: three 7-frame H.264 mp4 videos (56x40, written by
``wan_runtime.video_io.save_video``), a png image and ``metadata.csv`` files. Training runs at
32x48 with 5 frames in float32 on the CPU, so a step takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from factories import one_thread_fixture
from wan_runtime import tiny_release
from wan_runtime.video_io import save_video

from train.support import moving_square, write_csv


one_thread = one_thread_fixture("session")


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Path:
    """The tiny Wan2.1-T2V-1.3B release folder (DiT, umT5 + tokenizer, VAE)."""
    return tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.1-T2V-1.3B")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Videos, images and metadata files: ``metadata.csv`` (all four samples), ``one.csv`` (one video)."""
    folder = tmp_path_factory.mktemp("data")
    for i in range(3):
        save_video(moving_square(i), folder / f"clip{i}.mp4", fps=8)
    moving_square(7, 1, (50, 36))[0].save(folder / "still.png")
    moving_square(8, 1, (64, 40))[0].save(folder / "still.jpg")
    write_csv(folder / "metadata.csv", [
        {"video": "clip0.mp4", "prompt": "a red square slides right"},
        {"video": "clip1.mp4", "prompt": "a green square on a gradient"},
        {"video": "clip2.mp4", "prompt": "a blue box moving"},
        {"video": "still.png", "prompt": "a still picture"},
    ])
    write_csv(folder / "one.csv", [{"video": "clip0.mp4", "prompt": "a red square slides right"}])
    return folder
