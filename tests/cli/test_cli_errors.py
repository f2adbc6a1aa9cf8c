"""The ``wan`` command on bad input, as a new user meets it (issue 22): one line, no traceback, no
partial output, and every check that needs no computation made before any network loads.

Runs the real entry point on the embedded tiny-shapes model: in subprocesses, or through ``main()`` in
this process for errors raised before anything loads (the same code, without interpreter start-up). Whether a run got as far
as loading or denoising is read from its progress bars (``load:``, ``denoise:``), on unless ``-q``.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from wan_runtime.assets import default_model_dir
from wan_runtime.video_io import save_video

WAN = [sys.executable, "-m", "wan_cli"]
FAST = ["--steps", "1", "--device", "cpu", "--dtype", "float32"]


def wan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*WAN, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)




def one_error_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    """The single line of stderr starting with ``prefix``; there is no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------ usage errors, before anything loads


@pytest.mark.parametrize("args, fragment", [
    (["--cfg-scale", "inf"], "--cfg-scale: inf is not a finite number"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--vace-scale", "-inf"], "--vace-scale: -inf is not a finite number"),
    (["--camera-speed", "nan"], "--camera-speed"),
    (["--sigma-shift", "inf"], "--sigma-shift: inf is not a finite number"),
    (["--teacache", "inf"], "--teacache: inf is not a finite number"),
    (["--device", "gpu"], "'gpu' is not a device name"),
    (["--device", "cuda:99"], "'cuda:99': " + ("this machine has" if torch.cuda.is_available()
                                                else "this torch build has no CUDA support")),
])
def test_bad_numbers_and_devices_exit_2_naming_the_flag(wan_main, args, fragment, tmp_path) -> None:
    result = wan_main("generate", *args, "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 2
    assert fragment in one_error_line(result, "Error:")
    assert list(tmp_path.iterdir()) == []


def test_a_lora_strength_of_nan_is_a_usage_error(wan_main, tmp_path) -> None:
    lora = tmp_path / "style.safetensors"
    save_file({"x": torch.ones(1)}, str(lora))
    result = wan_main("generate", "--lora", f"{lora}:nan", "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 2
    assert "the strength nan is not a finite number" in one_error_line(result, "Error:")


@pytest.mark.parametrize("where, fragment", [
    ("under_a_file", "is a file, not a folder"),
    ("a_folder", "it is a folder; give a file name inside it"),
    ("read_only", "does not accept new files"),
])
def test_an_unwritable_output_is_refused_before_loading(wan_main, where, fragment, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "videos.mp4").mkdir()
    output = {"under_a_file": tmp_path / "notes.txt" / "out.mp4",
              "a_folder": tmp_path / "videos.mp4",
              # sysfs never accepts new regular files, not even from root (chmod would not stop root)
              "read_only": Path("/sys/wan-test-out.mp4")}[where]
    result = wan_main("generate", *FAST, "-o", str(output))
    assert result.returncode == 2
    line = one_error_line(result, "Error:")
    assert str(output) in line and fragment in line
    assert "load:" not in result.stderr  # no progress bar: nothing was loaded


@pytest.mark.parametrize("args, fragment", [
    (["--width", "100000"], "100000x64 (6,400,000 pixels per frame) is above the limit of 3,686,400 pixels"),
    (["--frames", "100000"], "num_frames=100001 is above the limit of 1025 frames"),
])
def test_sizes_beyond_the_caps_are_refused_before_loading(wan_main, args, fragment, tmp_path) -> None:
    result = wan_main("generate", *FAST, *args, "-o", str(tmp_path / "out.mp4"))
    assert result.returncode == 1
    assert fragment in one_error_line(result, "error:")
    assert "load:" not in result.stderr  # no progress bar: nothing was loaded


def test_a_cap_is_set_through_the_environment(wan_main, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WAN_MAX_FRAMES", "13")
    result = wan_main("generate", *FAST, "--frames", "17", "-o", str(tmp_path / "o.mp4"))
    assert result.returncode == 1 and "above the limit of 13 frames" in result.stderr


# ------------------------------------------------------------------ checks before the first step


@pytest.fixture(scope="module")
def tiny_without_vae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no-vae") / "tiny-shapes"
    shutil.copytree(default_model_dir(), folder)
    (folder / "Wan2.1_VAE.pth").unlink()
    return folder


def test_a_missing_vae_is_reported_before_denoising(tiny_without_vae, tmp_path) -> None:
    out = tmp_path / "out.mp4"
    result = wan("generate", "-m", str(tiny_without_vae), *FAST, "-o", str(out))
    assert result.returncode == 1
    assert "has no VAE (Wan2.1_VAE.pth)" in one_error_line(result, "error:")
    assert "denoise:" not in result.stderr and not out.exists()


def nan_lora(path: Path) -> Path:
    """A LoRA for the embedded DiT's first q projection with one NaN in its up factor."""
    with safe_open(str(default_model_dir() / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dim = f.get_slice("blocks.0.self_attn.q.weight").get_shape()[0]
    up = torch.randn(dim, 2) * 0.01
    up[1, 1] = float("nan")
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, dim) * 0.01,
               "blocks.0.self_attn.q.lora_B.weight": up}, str(path))
    return path


def test_a_lora_holding_nan_fails_before_denoising(tmp_path) -> None:
    lora = nan_lora(tmp_path / "broken.safetensors")
    out = tmp_path / "out.mp4"
    result = wan("generate", "--lora", str(lora), *FAST, "-o", str(out))
    assert result.returncode == 1
    line = one_error_line(result, "error:")
    assert "broken.safetensors: LoRA tensor 'blocks.0.self_attn.q.lora_B.weight' holds non-finite values" in line
    assert "denoise:" not in result.stderr and not out.exists()


# ------------------------------------------------------------------ inputs used wrongly without a word


def test_a_video_without_strength_and_a_long_prompt_are_warned_about(tmp_path) -> None:
    frames = [Image.new("RGB", (64, 64), (40 * i % 256, 90, 200)) for i in range(17)]
    video = save_video(frames, tmp_path / "in.mp4", fps=8)
    prompt = " ".join(["a red circle moving left on a white background"] * 80)
    out = tmp_path / "out.mp4"
    result = wan("generate", "-p", prompt, "--video", str(video), *FAST, "-q", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "input_video with denoising_strength=1.0 starts from pure noise" in result.stderr
    assert "tokens long, but the text encoder reads 512" in result.stderr
    assert out.is_file()


# ------------------------------------------------------------------ tracebacks only when asked


def test_debug_shows_the_traceback_that_is_otherwise_one_line(tmp_path) -> None:
    missing = tmp_path / "missing.safetensors"
    plain = wan("info", str(missing))
    assert plain.returncode == 1 and "missing.safetensors" in one_error_line(plain, "error:")
    debug = wan("--debug", "info", str(missing))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "missing.safetensors" in debug.stderr


# ------------------------------------------------------------------ SIGTERM is handled like Ctrl-C


def wait_for(process: subprocess.Popen, marker: bytes, limit: float = 240.0) -> bytes:
    """Read the process's stderr until ``marker`` appears (progress bars use \\r, not newlines)."""
    seen, deadline = b"", time.monotonic() + limit
    while marker not in seen:
        assert time.monotonic() < deadline and process.poll() is None, seen.decode(errors="replace")
        ready, _, _ = select.select([process.stderr], [], [], 1.0)
        if ready:
            seen += os.read(process.stderr.fileno(), 4096)
    return seen


def test_sigterm_during_generation_exits_143_and_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "out.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*WAN, "generate", "--steps", "400", "--device", "cpu", "--dtype", "float32",
                                "-o", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    wait_for(process, b"denoise:")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    assert b"Traceback" not in stderr and b"error: terminated (SIGTERM)" in stderr
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys, time
from PIL import Image
from wan_runtime.files import interrupt_on_sigterm
from wan_runtime.video_io import save_video

class Frames(list):
    passes = 0
    def __iter__(self):
        Frames.passes += 1
        for i, frame in enumerate(list.__iter__(self)):
            if Frames.passes == 2 and i == 4:  # the second pass is the encoding one
                print("writing", flush=True)
                time.sleep(120)
            yield frame

interrupt_on_sigterm()
save_video(Frames(Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(9)), sys.argv[1])
"""


def test_sigterm_in_the_middle_of_an_mp4_write_removes_the_temp_file(tmp_path) -> None:
    out = tmp_path / "out.mp4"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    temps = list(tmp_path.iterdir())
    assert len(temps) == 1 and temps[0].name.startswith(".out.mp4.")  # the encoder is mid-file
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "SIGTERM" in stderr
    assert list(tmp_path.iterdir()) == []
