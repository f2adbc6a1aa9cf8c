"""``wan generate`` with the Wan 2.2 models on tiny releases: by registry name (expert files found in their
folders, config.json fetched with each DiT) and from local release folders."""

from __future__ import annotations

import logging
from pathlib import Path

import av
import pytest

from wan_runtime import tiny_release

SMALL = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--device", "cpu", "--dtype", "float32",
         "-q", "-p", "a red cat", "--seed", "1"]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("Wan2.1-T2V-1.3B", "Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"):
        tiny_release.write_release(root, name)  # the 2.1 release is the home of the shared T5 and VAE
    return root


def frames_of(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("name", ["Wan2.2-T2V-A14B", "Wan2.2-TI2V-5B"])
def test_generate_by_registry_name(wan_main, models_root: Path, tmp_path: Path, caplog, name: str) -> None:
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO):
        result = wan_main("generate", "-m", name, "--models-dir", str(models_root), *SMALL, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert frames_of(out) == 5
    assert f"settings from the registry entry {name}" in result.stderr
    if name == "Wan2.2-T2V-A14B":
        assert "high-noise expert" in caplog.text  # both experts loaded, roles from their folders
        assert "experts: high-noise for" in caplog.text


def test_generate_from_release_folders(wan_main, models_root: Path, tmp_path: Path) -> None:
    for name in ("Wan2.2-T2V-A14B", "Wan2.2-TI2V-5B"):
        out = tmp_path / f"{name}.mp4"
        result = wan_main("generate", "-m", str(models_root / "Wan-AI" / name), *SMALL, "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert frames_of(out) == 5


def test_expert_flags_on_a_single_dit_are_refused(wan_main, models_root: Path, tmp_path: Path) -> None:
    result = wan_main("generate", "-m", "Wan2.1-T2V-1.3B", "--models-dir", str(models_root), *SMALL,
                      "--cfg-scale-2", "3", "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 1
    assert "cfg_scale_2 set, but the pipeline holds one DiT" in result.stderr


@pytest.mark.parametrize("name", ["Wan2.2-I2V-A14B", "Wan2.2-TI2V-5B"])
def test_image_to_video(wan_main, models_root: Path, tmp_path: Path, name: str) -> None:
    from PIL import Image

    image = tmp_path / "first.png"
    Image.new("RGB", (64, 32), (30, 160, 90)).save(image)
    out = tmp_path / "i2v.mp4"
    result = wan_main("generate", "-m", name, "--models-dir", str(models_root), *SMALL, "--image", str(image),
                      "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert frames_of(out) == 5


def test_an_image_on_the_t2v_pair_is_refused(wan_main, models_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "first.png"
    Image.new("RGB", (32, 32)).save(image)
    result = wan_main("generate", "-m", "Wan2.2-T2V-A14B", "--models-dir", str(models_root), *SMALL,
                      "--image", str(image), "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 1 and "has no image input" in result.stderr
