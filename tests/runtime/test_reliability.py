"""Bad input through the Python API fails at once with a message naming the value (issue 22).

Classes: non-finite numbers and tensors never reach the decoder; wrong types, devices and dtypes are
one-line errors; sizes beyond the caps or the machine's memory are refused before any network runs;
needed networks are checked before the first step; inputs are read by their real bit depth, and
what is cut or ignored is said. Every "before any network runs" claim is checked by counting calls
into the networks.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from factories import one_thread_fixture
from wan_runtime import WanVideoPipeline, tiny_release
from wan_runtime.finite import NonFiniteError
from wan_runtime.limits import RequestLimits, RequestTooLarge
from wan_runtime.lora import merge_lora
from wan_runtime.model_config import ModelConfig
from wan_runtime.request import GenerationRequest
from wan_runtime.video_io import load_image, save_video

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=0)

one_thread = one_thread_fixture("module")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_release.write_release(root, "Wan2.1-T2V-1.3B")
    return root / "Wan-AI" / "Wan2.1-T2V-1.3B"


def load(folder: Path, vae: bool = True) -> WanVideoPipeline:
    files = ["diffusion_pytorch_model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"] + (["Wan2.1_VAE.pth"] * vae)
    return WanVideoPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(folder / f)) for f in files],
        tokenizer_config=ModelConfig(path=str(folder / "google" / "umt5-xxl")), progress_bar_cmd=lambda x: x)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> WanVideoPipeline:
    return load(folder)


class Calls:
    """Counts forward calls into every network of a pipeline."""

    def __init__(self, pipe: WanVideoPipeline) -> None:
        self.count = 0
        self.handles = [net.register_forward_pre_hook(self.seen)
                        for net in (pipe.dit, pipe.vae, pipe.text_encoder) if net is not None]

    def seen(self, *_args) -> None:
        self.count += 1

    def __enter__(self) -> "Calls":
        return self

    def __exit__(self, *_exc) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------ 1. non-finite numbers and tensors


@pytest.mark.parametrize("field, value", [
    ("cfg_scale", math.inf), ("cfg_scale", math.nan), ("cfg_scale", -math.inf), ("sigma_shift", math.inf),
    ("denoising_strength", math.nan), ("vace_scale", math.inf), ("camera_control_speed", math.nan),
    ("tea_cache_l1_thresh", math.inf), ("mag_cache_retention_ratio", math.nan),
])
def test_non_finite_numbers_are_refused_before_any_network_runs(pipe, field, value) -> None:
    with Calls(pipe) as calls, pytest.raises(ValueError, match=rf"{field} must be a finite number, got {value}"):
        pipe(prompt="a cat", **{**SMALL, field: value})
    assert calls.count == 0


@pytest.mark.parametrize("field, value, fragment", [
    ("cfg_scale", "5", "cfg_scale must be a number, got str '5'"),
    ("sigma_shift", True, "sigma_shift must be a number, got bool True"),
    ("prompt", None, "prompt must be a str, got NoneType None (pass '' for no prompt)"),
    ("negative_prompt", 3, "negative_prompt must be a str, got int 3"),
    ("rand_device", "cpux", "rand_device='cpux' is not a device name"),
    ("tiled", "yes", "tiled must be True or False, got 'yes'"),
    ("motion_bucket_id", -1, "motion_bucket_id must be a non-negative integer"),
    ("tile_size", (30, 0), "tile_size must be two positive integers (height, width) in latents, got (30, 0)"),
    ("mag_cache_ratios", [1.0, math.nan], "mag_cache_ratios[1] must be a finite number, got nan"),
])
def test_wrong_types_name_the_field(field, value, fragment) -> None:
    with pytest.raises(ValueError) as error:
        GenerationRequest(**{**SMALL, field: value})
    assert fragment in str(error.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_prompt_embeds_are_refused_before_the_dit_runs(pipe, bad) -> None:
    embeds = torch.randn(1, 8, pipe.dit.config.text_dim)
    embeds[0, 3, 1] = bad
    with Calls(pipe) as calls, pytest.raises(NonFiniteError, match=r"prompt_embeds holds non-finite values"):
        pipe(prompt_embeds=embeds, cfg_scale=1.0, **SMALL)
    assert calls.count == 0


def lora_file(path: Path, pipe: WanVideoPipeline, poison: float | None = None, scale: float = 0.01) -> Path:
    """A LoRA for the DiT's first two q projections; ``poison`` goes into one entry of the second."""
    gen = torch.Generator().manual_seed(3)
    dim = pipe.dit.config.dim
    tensors = {}
    for block in (0, 1):
        tensors[f"blocks.{block}.self_attn.q.lora_A.weight"] = torch.randn(4, dim, generator=gen) * scale
        tensors[f"blocks.{block}.self_attn.q.lora_B.weight"] = torch.randn(dim, 4, generator=gen) * scale
    if poison is not None:
        tensors["blocks.1.self_attn.q.lora_B.weight"][2, 1] = poison
    save_file(tensors, str(path))
    return path


def dit_weights(pipe: WanVideoPipeline) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.dit.state_dict().items()}


def test_a_lora_holding_nan_is_refused_and_changes_nothing(pipe, tmp_path) -> None:
    before = dit_weights(pipe)
    path = lora_file(tmp_path / "nan.safetensors", pipe, poison=math.nan)
    with pytest.raises(NonFiniteError, match=r"nan\.safetensors: LoRA tensor 'blocks\.1\.self_attn\.q\.lora_B\.weight'"
                                             r" holds non-finite values \(1 NaN, 0 inf"):
        pipe.load_lora(pipe.dit, path)
    after = pipe.dit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("alpha, fragment", [(math.nan, "must be a finite number, got nan"),
                                             (math.inf, "must be a finite number, got inf"),
                                             ("1.0", "must be a number, got str '1.0'")])
def test_lora_strength_must_be_a_finite_number(pipe, tmp_path, alpha, fragment) -> None:
    path = lora_file(tmp_path / "ok.safetensors", pipe)
    with pytest.raises(ValueError, match="alpha") as error:
        pipe.load_lora(pipe.dit, path, alpha=alpha)
    assert fragment in str(error.value)


def test_a_merge_that_overflows_is_rolled_back(pipe, tmp_path) -> None:
    """The first layer merges fine, the second overflows float32: the first is subtracted again."""
    before = dit_weights(pipe)
    path = lora_file(tmp_path / "huge.safetensors", pipe, poison=3e38)
    with pytest.raises(NonFiniteError, match=r"blocks\.1\.self_attn\.q\.weight with the LoRA added"):
        merge_lora(pipe.dit, path, alpha=1e3)
    after = pipe.dit.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-6) for k in before)


def test_latents_going_non_finite_stop_at_that_step(pipe) -> None:
    """A finite but absurd guidance scale blows the latents up within a few steps: the run stops at the
    first non-finite step, which the callbacks of the steps before it confirm were finite."""
    finite_steps = []

    def record(step, _t, latents) -> None:
        assert torch.isfinite(latents).all()
        finite_steps.append(step)

    with pytest.raises(NonFiniteError) as error:
        pipe(prompt="a cat", negative_prompt="a dog", cfg_scale=1e30, step_callback=record,
             **{**SMALL, "num_inference_steps": 8})
    message = str(error.value)
    assert f"went non-finite at denoising step {len(finite_steps) + 1} of 8" in message
    assert "nothing was decoded" in message


def test_a_vae_that_overflows_is_an_error_not_a_black_video(folder) -> None:
    pipe = load(folder)
    with torch.no_grad():
        next(p for name, p in pipe.vae.named_parameters() if name.startswith("decoder")).fill_(math.inf)
    with pytest.raises(NonFiniteError, match="the decoded video holds non-finite values"):
        pipe(prompt="a cat", **SMALL)


def test_other_numbers_are_checked_where_they_enter(pipe, tmp_path) -> None:
    with pytest.raises(ValueError, match="vram_limit must be a finite number, got nan"):
        pipe.enable_vram_management(vram_limit=math.nan)
    assert pipe.vram is None
    frames = [Image.new("RGB", (16, 16))] * 3
    with pytest.raises(ValueError, match="fps must be a positive number, got inf"):
        save_video(frames, tmp_path / "x.mp4", fps=math.inf)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 2. devices and dtypes


@pytest.mark.parametrize("device, fragment", [
    ("gpu", "device='gpu' is not a device name; expected e.g. 'cpu', 'cuda'"),
    ("cuda:99", "device='cuda:99'"),
])
def test_bad_devices_fail_before_any_file_is_read(folder, device, fragment) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        fragment = "this machine has"
    with pytest.raises(ValueError) as error:
        WanVideoPipeline.from_pretrained(device=device, model_configs=[ModelConfig(path=str(folder / "nope.pth"))])
    assert fragment in str(error.value)  # not the missing file: the device is checked first


def test_dtype_names_are_accepted_and_wrong_ones_named() -> None:
    assert WanVideoPipeline(device="cpu", torch_dtype="float16").torch_dtype == torch.float16
    assert WanVideoPipeline(device="cpu", torch_dtype="torch.bfloat16").torch_dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"torch_dtype='float8' is not a dtype name"):
        WanVideoPipeline(device="cpu", torch_dtype="float8")
    with pytest.raises(ValueError, match=r"torch_dtype=torch\.int8 is not a dtype the pipeline computes in"):
        WanVideoPipeline(device="cpu", torch_dtype=torch.int8)


# ------------------------------------------------------------------ 3. limits before hours of work


@pytest.mark.parametrize("size, fragment", [
    (dict(num_frames=100000), "num_frames=100001 is above the limit of 1025 frames"),
    (dict(width=100000), "100000x32 (3,200,000 pixels per frame)"),
])
def test_caps_refuse_before_any_network_runs(pipe, size, fragment) -> None:
    request = {**SMALL, **size}
    if "width" in size:
        pipe.limits = RequestLimits(max_pixels=1_000_000)
    try:
        with Calls(pipe) as calls, pytest.raises(RequestTooLarge) as error:
            pipe(prompt="a cat", **request)
    finally:
        pipe.limits = RequestLimits.from_env()
    assert fragment in str(error.value) and calls.count == 0
    assert "GiB beyond the weights)" in str(error.value)  # the memory it would take, from the loaded networks


def test_caps_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("WAN_MAX_FRAMES", "9")
    monkeypatch.setenv("WAN_MAX_PIXELS", "4096")
    limits = RequestLimits.from_env()
    assert (limits.max_frames, limits.max_pixels) == (9, 4096)
    with pytest.raises(RequestTooLarge, match="num_frames=13 is above the limit of 9"):
        limits.check_size(GenerationRequest(**{**SMALL, "num_frames": 13}))
    monkeypatch.setenv("WAN_MAX_FRAMES", "lots")
    with pytest.raises(ValueError, match=r"\$WAN_MAX_FRAMES='lots' is not an integer"):
        RequestLimits.from_env()


def test_a_request_beyond_the_machines_memory_is_refused_with_the_numbers(pipe) -> None:
    """Frames enough that the decoded float32 video alone is larger than this machine's RAM."""
    total = psutil.virtual_memory().total
    height, width = 256, 256
    frames = 4 * math.ceil(total / (3 * height * width * 4) / 4) + 1
    pipe.limits = RequestLimits(max_frames=10 ** 9, max_pixels=10 ** 9)
    try:
        with Calls(pipe) as calls, pytest.raises(RequestTooLarge) as error:
            pipe(prompt="a cat", height=height, width=width, num_frames=frames, num_inference_steps=1)
    finally:
        pipe.limits = RequestLimits.from_env()
    message = str(error.value)
    assert f"256x256, {frames} frames needs about" in message and "GiB free on cpu" in message
    assert calls.count == 0


def test_the_estimate_counts_the_dit_tokens(pipe) -> None:
    request = GenerationRequest(height=64, width=96, num_frames=9)
    estimate = pipe.limits.check_memory(pipe, request)
    assert estimate.tokens == 3 * (64 // 16) * (96 // 16)  # 3 latent frames of 4x6 patches
    wider = pipe.limits.check_memory(pipe, GenerationRequest(height=64, width=192, num_frames=9))
    assert wider.tokens == 2 * estimate.tokens and wider.parts["DiT"] == 2 * estimate.parts["DiT"]


# ------------------------------------------------------------------ 4. needed networks before the first step


def test_a_missing_vae_is_reported_before_the_first_step(folder) -> None:
    pipe = load(folder, vae=False)
    with Calls(pipe) as calls, pytest.raises(ValueError, match="decoding needs the VAE"):
        pipe(prompt="a cat", **SMALL)
    assert calls.count == 0
    latents = pipe(prompt="a cat", output_type="latent", **SMALL)  # without decoding it is fine
    assert torch.isfinite(latents).all()


# ------------------------------------------------------------------ 5. inputs read as they are


def test_a_16_bit_greyscale_png_keeps_its_tones(tmp_path) -> None:
    levels = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # really stored as 16 bit
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (np.asarray(image)[..., 0] == np.asarray(image)[..., 2]).all()


def test_a_prompt_over_512_tokens_is_cut_with_a_warning(pipe, caplog) -> None:
    prompt = " ".join(f"word{i} colour shape" for i in range(400))
    counted = len(pipe.prompter.tokenizer(prompt)["input_ids"])
    assert counted > 512
    with caplog.at_level(logging.WARNING, logger="wan_runtime.text"):
        pipe.prompter.encode(prompt)
    assert f"a prompt is {counted} tokens long, but the text encoder reads 512" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wan_runtime.text"):
        pipe.prompter.encode(prompt)  # said once per prompt (training encodes the same ones every epoch)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="wan_runtime.text"):
        pipe.prompter.encode("a short prompt")
    assert caplog.text == ""
