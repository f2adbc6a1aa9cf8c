"""The embedded tiny-shapes model: its files load, it generates 17x64x64 clips fast that show the
prompted colour moving the prompted way, and it is the default of ``wan generate`` (and of the
adherence benchmark, which prints the rates over the whole grid)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_models.configs import DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_runtime import ModelConfig, WanVideoPipeline
from wan_runtime.assets import DEFAULT_MODEL_SETTINGS, default_model_dir

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.shapes import measure_clip, prompt_for  # noqa: E402
PROMPT = "a red circle moving left on a white background"


@pytest.fixture(scope="module")
def pipe() -> WanVideoPipeline:
    folder = default_model_dir()
    configs = [ModelConfig(path=[str(p) for p in sorted(folder.glob(pattern))])
               for pattern in (DIT_FILES, T5_FILE, VAE_FILE)]
    return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                            tokenizer_config=ModelConfig(path=str(folder / T5_TOKENIZER)))


def test_shipped_files_are_small_and_complete() -> None:
    folder = default_model_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6
    for name in ("diffusion_pytorch_model.safetensors", "config.json", T5_FILE, VAE_FILE, f"{T5_TOKENIZER}/tokenizer.json"):
        assert (folder / name).is_file(), name


def test_generates_17_frames_of_64x64(pipe: WanVideoPipeline) -> None:
    frames = pipe(prompt=PROMPT, height=64, width=64, num_frames=17, num_inference_steps=4, seed=0,
                  progress_bar_cmd=lambda steps: steps)
    assert len(frames) == 17
    assert frames[0].size == (64, 64)


# One prompt per colour, directions and shapes varied, on every background; seed 0 each.
ASKED = [("red", "circle", "left", "white"), ("orange", "square", "up", "black"), ("yellow", "triangle", "still", "gray"),
         ("green", "circle", "down", "white"), ("blue", "square", "right", "gray"), ("purple", "triangle", "left", "black")]


def test_clips_show_the_prompted_colour_and_motion(pipe: WanVideoPipeline) -> None:
    """Measured from the frames (tools.shapes.measure_clip), at the shipped settings; the benchmark's
    full-grid rates are in docs/tiny_model.md. At least 5 of the 6 must match on each attribute."""
    hits = {"color": [], "direction": []}
    for color, shape, direction, background in ASKED:
        frames = pipe(prompt=prompt_for(shape, color, direction, background), height=64, width=64, num_frames=17,
                      num_inference_steps=DEFAULT_MODEL_SETTINGS["steps"], cfg_scale=DEFAULT_MODEL_SETTINGS["cfg_scale"],
                      seed=0, progress_bar_cmd=lambda steps: steps)
        measured = measure_clip(frames)
        hits["color"].append(measured.color == color)
        hits["direction"].append(measured.direction == direction)
    assert sum(hits["color"]) >= 5 and sum(hits["direction"]) >= 5, (ASKED, hits)


def test_wan_generate_without_model_writes_an_mp4(tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "wan_cli", "generate", "--prompt", PROMPT, "--steps", "4", "--seed", "0",
         "--device", "cpu", "--dtype", "float32", "--quiet", "--output", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert f"{DEFAULT_MODEL_SETTINGS['frames']} frames, 64x64" in result.stdout


def test_adherence_benchmark_runs_on_a_small_grid() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/tiny_adherence.py"), "--small", "--seeds", "1", "--steps", "4"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "color" in result.stdout.lower()
