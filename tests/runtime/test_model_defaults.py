"""A Wan 2.2 pipeline takes what the caller leaves out from its registry entry (the official settings);
a Wan 2.1 pipeline keeps the seed's defaults. Image sizes follow the official rules, worked by hand here."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from wan_models.configs import VAE22_FILE, VAE_FILE
from wan_runtime import tiny_release
from wan_runtime.defaults import fit_area, fit_area_closest_ratio, model_defaults, registry_entry
from wan_runtime.schedulers import FlowUniPCScheduler

from factories import load_tiny_pipeline, one_thread_fixture

one_thread = one_thread_fixture("module")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name in ("Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B", "Wan2.1-T2V-1.3B"):
        tiny_release.write_release(root, name)
    return root


def load(root: Path, name: str, experts: tuple[str, ...] = ("high_noise_model", "low_noise_model")):
    folder = root / "Wan-AI" / name
    dits = [folder / e for e in experts] if (folder / "high_noise_model").is_dir() else [folder]
    return load_tiny_pipeline(folder, dits, VAE22_FILE if (folder / VAE22_FILE).is_file() else VAE_FILE)


def test_each_pipeline_finds_its_registry_entry(root) -> None:
    assert registry_entry(load(root, "Wan2.2-TI2V-5B")).name == "Wan2.2-TI2V-5B"
    assert registry_entry(load(root, "Wan2.2-T2V-A14B")).name == "Wan2.2-T2V-A14B"
    assert registry_entry(load(root, "Wan2.2-I2V-A14B")).name == "Wan2.2-I2V-A14B"
    assert registry_entry(load(root, "Wan2.2-T2V-A14B", ("high_noise_model",))) is None  # one expert alone
    wan21 = load(root, "Wan2.1-T2V-1.3B")
    assert registry_entry(wan21) is None and model_defaults(wan21, {}) == {}


def test_the_official_settings_fill_what_is_left_out(root) -> None:
    ti2v = model_defaults(load(root, "Wan2.2-TI2V-5B"), {})
    assert ti2v == dict(num_inference_steps=50, sigma_shift=5.0, sampler="unipc", num_frames=121, cfg_scale=5.0,
                        height=704, width=1280)
    t2v = model_defaults(load(root, "Wan2.2-T2V-A14B"), {"num_inference_steps": 4})
    assert (t2v["cfg_scale"], t2v["cfg_scale_2"], t2v["switch_DiT_boundary"], t2v["sigma_shift"]) == (4.0, 3.0, 0.875, 12.0)
    assert "num_inference_steps" not in t2v
    # A caller's cfg_scale serves both experts: no registry cfg_scale_2 slips in beside it.
    assert "cfg_scale_2" not in model_defaults(load(root, "Wan2.2-T2V-A14B"), {"cfg_scale": 2.0})
    i2v = model_defaults(load(root, "Wan2.2-I2V-A14B"), {})
    assert (i2v["switch_DiT_boundary"], i2v["cfg_scale"], "cfg_scale_2" in i2v) == (0.9, 3.5, False)


def test_a_call_uses_them_and_says_so(root, caplog) -> None:
    pipe = load(root, "Wan2.2-TI2V-5B")
    with caplog.at_level(logging.INFO, logger="wan_runtime.defaults"):
        pipe("a cat", height=32, width=32, num_frames=5, seed=0, output_type="latent", progress_bar_cmd=lambda x: x,
             cfg_scale=1.0)
    assert isinstance(pipe.scheduler, FlowUniPCScheduler) and len(pipe.scheduler.timesteps) == 50
    assert "settings from the registry entry Wan2.2-TI2V-5B: num_inference_steps=50, sigma_shift=5.0" in caplog.text


def test_image_sizes_follow_the_official_rules() -> None:
    # TI2V (closest ratio, multiples of 32 within 704*1280): a 16:9 image. Width first: 1265.7 -> 1248, then
    # 901120/1248 = 722 -> 704 (ratio 1.7727); height first: 712.0 -> 704, 901120/704 = 1280 (ratio 1.818).
    assert fit_area_closest_ratio(1280, 720, 704 * 1280, 32) == (1248, 704)
    assert fit_area_closest_ratio(704, 1280, 704 * 1280, 32) == (704, 1280)
    # A14B (sides from sqrt(area * ratio), multiples of 16): 1000x500 within 480*832 = 399360 pixels:
    # width sqrt(798720) = 893.7 -> 880, height sqrt(199680) = 446.9 -> 432.
    assert fit_area(1000, 500, 480 * 832, 16) == (880, 432)


def test_an_image_without_a_size_sets_the_size(root) -> None:
    pipe = load(root, "Wan2.2-I2V-A14B")
    image = Image.new("RGB", (1000, 500), (120, 30, 200))
    taken = model_defaults(pipe, {"input_image": image})
    assert (taken["width"], taken["height"]) == (880, 432)
    assert "height" not in model_defaults(pipe, {"input_image": image, "height": 480})
