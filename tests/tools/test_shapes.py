"""The shapes dataset tool, the clip measurement and the tiny-adherence benchmark (tools/, benchmarks/)."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import shapes_dataset  # noqa: E402
from tools.shapes import ClipSpec, measure_clip, prompt_for, render_clip, sample_specs  # noqa: E402
from tools.shapes.render import render_array  # noqa: E402
from wan_runtime.video_io import load_video, save_video  # noqa: E402

ATTRIBUTES = ("color", "direction")


def roundtrip(spec: ClipSpec, folder: Path) -> list[Image.Image]:
    """A clip as the trainer and the benchmark see it: through an mp4 file."""
    return load_video(save_video(render_clip(spec), folder / "clip.mp4", fps=16, quality=9))


def degrade(frames: list[Image.Image], rng: np.random.Generator) -> list[np.ndarray]:
    """Blur and per-pixel noise, standing in for an imperfect generated video."""
    out = []
    for frame in frames:
        blurred = np.asarray(frame.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
        out.append(np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8))
    return out


def hit_rates(pairs) -> dict[str, float]:
    """Fraction of (spec, measurement) pairs whose colour / direction were read right."""
    pairs = list(pairs)
    return {a: sum(getattr(m, a) == getattr(s, a) for s, m in pairs) / len(pairs) for a in ATTRIBUTES}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[tuple[ClipSpec, list[Image.Image]]]:
    """48 dataset clips over every background, decoded from mp4."""
    folder = tmp_path_factory.mktemp("clips")
    specs = sample_specs(48, seed=7)
    assert {s.background for s in specs} == {"white", "black", "gray", "noise"}
    return [(spec, roundtrip(spec, folder)) for spec in specs]


def test_prompts_read_naturally():
    assert prompt_for("circle", "red", "left", "white") == "a red circle moving left on a white background"
    assert prompt_for("square", "blue", "still", "black") == "a blue square standing still on a black background"
    assert prompt_for("triangle", "orange", "up", "noise") == "an orange triangle moving up on a noisy background"
    with pytest.raises(ValueError, match="unknown word 'pink'"):
        prompt_for("circle", "pink", "left", "white")


def test_cli_writes_readable_videos_and_metadata(tmp_path, capsys):
    shapes_dataset.main([str(tmp_path), "--count", "6", "--seed", "3", "--frames", "17", "--size", "64",
                         "--workers", "2"])
    assert "6 clips" in capsys.readouterr().out
    with (tmp_path / "metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == ["video", "prompt", "shape", "color", "direction", "background"]
    for i, row in enumerate(rows):
        assert row["video"] == f"videos/{i:05d}.mp4"
        assert row["prompt"] == prompt_for(row["shape"], row["color"], row["direction"], row["background"])
        frames = load_video(tmp_path / row["video"])
        assert len(frames) == 17 and all(f.size == (64, 64) for f in frames)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [f"{i:05d}.mp4" for i in range(6)]


def test_clips_are_deterministic_by_seed(tmp_path):
    first, again, other = sample_specs(5, seed=11), sample_specs(5, seed=11), sample_specs(5, seed=12)
    assert first == again and first != other
    assert sample_specs(3, seed=11) == first[:3]  # clip i depends on (seed, i) only
    assert all(np.array_equal(render_array(a), render_array(b)) for a, b in zip(first, again))
    for name in ("a", "b"):
        shapes_dataset.main([str(tmp_path / name), "--count", "3", "--seed", "11", "--workers", "1"])
    assert (tmp_path / "a/metadata.csv").read_text() == (tmp_path / "b/metadata.csv").read_text()
    decoded = [np.stack([np.asarray(f) for f in load_video(tmp_path / n / "videos/00002.mp4")]) for n in "ab"]
    assert np.array_equal(*decoded)


def test_shape_stays_inside_and_moves_at_constant_speed():
    for spec in sample_specs(40, seed=5):
        centres = np.array([spec.centre(t) for t in range(spec.frames)])
        assert (centres - spec.extent / 2 >= 0).all() and (centres + spec.extent / 2 <= spec.size).all()
        steps = np.diff(centres, axis=0)
        assert np.allclose(steps, steps[0])
        assert (np.abs(steps[0]).sum() == 0) == (spec.direction == "still")


def test_paths_are_centred_near_the_middle_of_the_frame():
    """A prompt implies roughly where its shape is: the path's midpoint lies within the placement
    jitter of the frame centre, and a shape moving left starts right of the centre (and so on)."""
    jitter = 0.08 * 64
    for spec in sample_specs(200, seed=6):
        middle = np.array(spec.centre((spec.frames - 1) / 2))
        assert (np.abs(middle - 32) <= jitter + 1e-9).all(), (spec, middle)
        start = spec.centre(0)
        if spec.direction in ("left", "right"):
            assert (start[0] > 32) == (spec.direction == "left")
        if spec.direction in ("up", "down"):
            assert (start[1] > 32) == (spec.direction == "up")


def test_measure_reads_dataset_clips(clips):
    rates = hit_rates((spec, measure_clip(frames)) for spec, frames in clips)
    assert rates["color"] >= 0.95 and rates["direction"] >= 0.95, rates


def test_measure_survives_noise_and_blur(clips):
    rng = np.random.default_rng(0)
    rates = hit_rates((spec, measure_clip(degrade(frames, rng))) for spec, frames in clips)
    assert rates["color"] >= 0.90 and rates["direction"] >= 0.90, rates


def test_measure_finds_nothing_in_blank_or_noise_videos():
    blank = [np.full((64, 64, 3), 255, np.uint8)] * 9
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(9)]
    for frames in (blank, noise):
        m = measure_clip(frames)
        assert m.color is None and m.direction is None


@pytest.fixture(scope="module")
def benchmark():
    """benchmarks/tiny_adherence.py as a module."""
    spec = importlib.util.spec_from_file_location("tiny_adherence", REPO / "benchmarks" / "tiny_adherence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_a_tiny_random_release(benchmark, tmp_path, capsys):
    from wan_runtime import tiny_release

    model = tiny_release.write_release(tmp_path, "Wan2.1-T2V-1.3B")
    benchmark.main(["--model", str(model), "--small", "--seeds", "1", "--steps", "1", "--frames", "5",
                    "--height", "32", "--width", "32", "--check-measure", "4"])
    out = capsys.readouterr().out
    assert "measurement check: 4 dataset clips" in out and "adherence" in out
    rates = re.findall(r"^(color|direction) +\d+ +\d+ +([\d.]+)", out, re.M)  # check table, then model table
    assert [name for name, _ in rates] == ["color", "direction"] * 2, out
    assert all(0 <= float(rate) <= 1 for _, rate in rates), out
    assert re.search(r"^color +\d+ +8 ", out, re.M), out  # 2 colours x 2 shapes x 2 directions x 1 seed


def test_benchmark_says_when_the_model_is_missing(benchmark, tmp_path):
    with pytest.raises(SystemExit, match="no model folder at .*nowhere.*pass --model PATH"):
        benchmark.main(["--model", str(tmp_path / "nowhere")])
