"""The ``wan`` command through its real entry point (subprocesses), on tiny generated models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from wan_runtime import tiny_release

WAN = [sys.executable, "-m", "wan_cli"]
SMALL = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--device", "cpu",
         "--dtype", "float32", "-q"]


def wan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*WAN, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_release.write_release(root, "Wan2.1-T2V-1.3B")
    return root


def read_video(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


@pytest.mark.parametrize("command", ["", "generate", "download", "models", "info", "convert", "train",
                                     "serve", "worker"])
def test_help(command: str) -> None:
    result = wan(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower()


def test_generate_from_folder_and_registry(models_root: Path, tmp_path: Path) -> None:
    folder = models_root / "Wan-AI" / "Wan2.1-T2V-1.3B"
    out = tmp_path / "a.mp4"
    result = wan("generate", "-m", str(folder), "-p", "a red cat", "--seed", "3", *SMALL, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert read_video(out) == (5, 48, 32)
    last = result.stdout.strip().splitlines()[-1]
    assert str(out) in last and "denoise" in last and "decode" in last
    out2 = tmp_path / "b.mp4"
    # The folder's tiny DiT matches no registry entry, so it samples at the fallback settings; the
    # registry name defaults to its official ones (unipc, shift 8, cfg 6, 16 fps) unless given.
    fallback = ["--sampler", "euler", "--sigma-shift", "5", "--cfg-scale", "5", "--fps", "15"]
    result = wan("generate", "-m", "Wan2.1-T2V-1.3B", "--models-dir", str(models_root), "-p", "a red cat",
                 "--seed", "3", *SMALL, *fallback, "-o", str(out2))
    assert result.returncode == 0, result.stderr
    assert out2.read_bytes() == out.read_bytes()  # same model, seed and prompt: the same video


def test_config_file_and_rounding(models_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{models_root / "Wan-AI" / "Wan2.1-T2V-1.3B"}"\nprompt = "a dog"\n'
                      'height = 30\nwidth = 40\nframes = 6\nsteps = 1\ndevice = "cpu"\ndtype = "float32"\n')
    out = tmp_path / "c.mp4"
    result = wan("generate", "--config", str(config), "-q", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert read_video(out) == (9, 48, 32)  # 6 frames -> 9 (4k+1), 30x40 -> 32x48
    assert "rounded up" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "--steps"),
    (["--camera-direction", "Sideways"], "Sideways"),
    (["--sampler", "heun"], "heun"),
    (["--denoising-strength", "1.5"], "--denoising-strength"),
    (["--dtype", "float8"], "float8"),
    (["-o", "video.avi"], "video.avi"),
    (["--sliding-window", "9"], "SIZE:STRIDE"),
    (["--sigma-shift", "0"], "--sigma-shift"),
    (["-m", "Wan2.1-T2V-99B"], "Wan2.1-T2V-99B"),
])
def test_bad_values_exit_2_with_one_line(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = wan("generate", "-m", "Wan2.1-T2V-1.3B", *args, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_says_how_to_download(tmp_path: Path) -> None:
    out = tmp_path / "never.mp4"
    result = wan("generate", "-m", "Wan2.1-T2V-14B", "--models-dir", str(tmp_path), "-o", str(out))
    assert result.returncode == 1
    assert "modelscope download --model Wan-AI/Wan2.1-T2V-14B" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_failure_mid_run_leaves_no_output(models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "v2v.mp4"
    missing_video = tmp_path / "nope.mp4"
    result = wan("generate", "-m", str(models_root / "Wan-AI" / "Wan2.1-T2V-1.3B"), "--video", str(missing_video),
                 *SMALL, "-o", str(out))
    assert result.returncode == 1 and "nope.mp4" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_info_convert(models_root: Path, tmp_path: Path) -> None:
    result = wan("models", "--local-dir", str(models_root))
    assert result.returncode == 0
    row = next(line for line in result.stdout.splitlines() if line.startswith("Wan2.1-T2V-1.3B "))
    assert "+Wan2.1_VAE.pth" in row and "+diffusion_pytorch_model*.safetensors" in row
    assert "-diffusion_pytorch_model" in next(l for l in result.stdout.splitlines() if l.startswith("Wan2.1-T2V-14B "))

    dit = models_root / "Wan-AI" / "Wan2.1-T2V-1.3B" / "diffusion_pytorch_model.safetensors"
    result = wan("info", str(dit))
    assert result.returncode == 0, result.stderr
    assert "format:   official" in result.stdout and "network:  dit (t2v)" in result.stdout

    converted = tmp_path / "transformer"
    result = wan("convert", str(dit), str(converted), "--to", "diffusers")
    assert result.returncode == 0, result.stderr
    assert (converted / "config.json").is_file()
    info = wan("info", str(converted)).stdout
    assert "format:   diffusers" in info and "num_heads=2" in info  # heads from the written config.json
    back = tmp_path / "dit_official.safetensors"
    assert wan("convert", str(converted), str(back), "--to", "official").returncode == 0
    assert "num_heads=2" in wan("info", str(dit)).stdout  # heads from the official config.json
    from safetensors.torch import load_file

    original, round_trip = load_file(dit), load_file(back)
    assert original.keys() == round_trip.keys()
    assert all((original[k] == round_trip[k]).all() for k in original)


def test_download_offline_is_a_clear_error(tmp_path: Path) -> None:
    result = wan("download", "Wan2.1-T2V-1.3B", "--local-dir", str(tmp_path))
    assert result.returncode == 1
    assert "ModelScope is unreachable" in result.stderr and "Traceback" not in result.stderr


def test_speed_flags(models_root: Path, tmp_path: Path) -> None:
    """--attention, --fp8, --teacache and --lora run end to end; LoRA and FP8 change the video."""
    import torch
    from safetensors.torch import save_file

    folder = models_root / "Wan-AI" / "Wan2.1-T2V-1.3B"
    common = ["-m", str(folder), "-p", "a cat", "--seed", "1", "--height", "32", "--width", "48", "--frames", "5",
              "--steps", "4", "--device", "cpu", "--dtype", "float32", "-q"]
    plain = tmp_path / "plain.mp4"
    assert wan("generate", *common, "-o", str(plain)).returncode == 0
    gen = torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    save_file({f"blocks.{b}.self_attn.{m}.lora_{ab}.weight": torch.randn(shape, generator=gen)
               for b in range(2) for m in "qkvo" for ab, shape in (("A", (2, 32)), ("B", (32, 2)))}, str(lora))
    variants = {"lora": ["--lora", f"{lora}:0.8"], "fp8": ["--fp8"], "math": ["--attention", "math"],
                "offload": ["--offload", "--vram-limit", "0.5"],
                "teacache": ["--teacache", "0.5", "--teacache-model", "Wan2.1-T2V-1.3B"]}
    for name, flags in variants.items():
        out = tmp_path / f"{name}.mp4"
        result = wan("generate", *common, *flags, "-o", str(out))
        assert result.returncode == 0, (name, result.stderr)
        assert read_video(out) == (5, 48, 32)
        if name in ("lora", "fp8"):
            assert out.read_bytes() != plain.read_bytes(), name
        if name == "offload":  # same weights and dtype: offloading changes nothing in the video
            assert out.read_bytes() == plain.read_bytes()
    bad = wan("generate", *common, "--teacache", "0.1", "--teacache-model", "Wan2.1-T2V-2B", "-o", str(tmp_path / "x.mp4"))
    assert bad.returncode == 2 and "no TeaCache coefficients for 'Wan2.1-T2V-2B'" in bad.stderr


def test_train_passes_the_seed_flags_through() -> None:
    result = wan("train", "--help")
    assert result.returncode == 0
    for flag in ("--dataset_base_path", "--lora_target_modules", "--trainable_models", "--extra_inputs"):
        assert flag in result.stdout
    bad = wan("train", "--dataset_base_path", "x", "--lora_rank", "many")
    assert bad.returncode == 2 and "--lora_rank" in bad.stderr
