"""``WanVideoPipeline`` end to end on tiny random releases written in the released folder layout.

Every generation mode runs through ``from_pretrained`` -> ``__call__`` -> PIL frames (or latents) on
the CPU in float32 at 48x32, 5 frames, 2 steps. The releases are written once per module; the shared
T5/VAE/tokenizer files exist only in the Wan2.1-T2V-1.3B folder and the CLIP file only in the
Wan2.1-I2V-14B-480P folder (what a download with ``redirect_common_files`` leaves on disk), so every
registry load goes through the redirect. The 14B releases are split in two shards.

The networks are random, so outputs are noise: the tests check shapes, determinism, that each input
reaches the output, that equivalent paths agree, and that bad input fails with a clear error raised by
our code (never deep inside torch).
"""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

from factories import one_thread_fixture
from wan_models import MODELS
from wan_models.configs import CLIP_FILE, DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_runtime import WanVideoPipeline, tiny_release
from wan_runtime.images import video_to_tensor
from wan_runtime.model_config import ModelConfig, ModelFilesMissing
from wan_runtime.request import GenerationRequest
from wan_runtime.video_io import load_video, save_video

HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 5, 2
LATENTS = (1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)

RELEASES = {
    "t2v": "Wan2.1-T2V-1.3B",
    "i2v": "Wan2.1-I2V-14B-480P",
    "flf2v": "Wan2.1-FLF2V-14B-720P",
    "inp": "Wan2.1-Fun-1.3B-InP",
    "control": "Wan2.1-Fun-1.3B-Control",
    "reference": "Wan2.1-Fun-V1.1-1.3B-Control",
    "camera": "Wan2.1-Fun-V1.1-1.3B-Control-Camera",
    "vace": "Wan2.1-VACE-1.3B",
}
SHARDED = {"i2v", "flf2v"}
SPEED = tiny_release.SPEED_CONTROL
T2V_ID = MODELS[RELEASES["t2v"]].model_id
I2V_ID = MODELS[RELEASES["i2v"]].model_id
HOME = {T5_FILE: T2V_ID, VAE_FILE: T2V_ID, T5_TOKENIZER: T2V_ID, CLIP_FILE: I2V_ID}
TEACACHE = dict(tea_cache_l1_thresh=10.0, tea_cache_model_id="Wan2.1-T2V-1.3B")


# --------------------------------------------------------------------------- inputs


def picture(seed: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def video(seed: int, frames: int = FRAMES, size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Image.Image]:
    return [picture(seed * 1000 + i, size) for i in range(frames)]


def mask(frames: int = FRAMES, left: bool = True) -> list[Image.Image]:
    """White (generate) on the left or right half, black (keep) elsewhere."""
    array = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    if left:
        array[:, : WIDTH // 2] = 255
    else:
        array[:, WIDTH // 2:] = 255
    return [Image.fromarray(array)] * frames


def pixels(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f) for f in frames])


# Every mode: (which release, its inputs for a video of n frames).
MODES: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "t2v": ("t2v", lambda n: {}),
    "i2v": ("i2v", lambda n: dict(input_image=picture(1))),
    "flf2v": ("flf2v", lambda n: dict(input_image=picture(1), end_image=picture(2))),
    "v2v": ("t2v", lambda n: dict(input_video=video(3, n), denoising_strength=0.6)),
    "fun_inp": ("inp", lambda n: dict(input_image=picture(1), end_image=picture(2))),
    "fun_control": ("control", lambda n: dict(control_video=video(4, n))),
    "fun_control_image": ("control", lambda n: dict(control_video=video(4, n), input_image=picture(1))),
    "fun_reference": ("reference", lambda n: dict(control_video=video(4, n), reference_image=picture(5))),
    "camera_left": ("camera", lambda n: dict(input_image=picture(1), camera_control_direction="Left")),
    "camera_right_down": ("camera", lambda n: dict(input_image=picture(1), camera_control_direction="RightDown")),
    "vace_video_mask": ("vace", lambda n: dict(vace_video=video(6, n), vace_video_mask=mask(n))),
    "vace_reference": ("vace", lambda n: dict(vace_reference_image=picture(7))),
    "vace_all": ("vace", lambda n: dict(vace_video=video(6, n), vace_video_mask=mask(n),
                                        vace_reference_image=picture(7))),
    "speed": ("speed", lambda n: dict(motion_bucket_id=50)),
}


# --------------------------------------------------------------------------- models


one_thread = one_thread_fixture("module")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """Tiny releases of every mode's model plus the motion controller, shared files only at home."""
    root = tmp_path_factory.mktemp("models")
    for key, name in RELEASES.items():
        tiny_release.write_release(root, name, shards=2 if key in SHARDED else 1)
    tiny_release.write_motion_controller(root)
    for name in RELEASES.values():
        folder = root / MODELS[name].model_id
        for shared, home in HOME.items():
            target = folder / shared
            if MODELS[name].model_id == home or not target.exists():
                continue
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    return root


def registry_configs(key: str) -> list[ModelConfig]:
    """``model_id`` + ``origin_file_pattern`` per released file (the tokenizer comes by default)."""
    names = [RELEASES["t2v"], SPEED] if key == "speed" else [RELEASES[key]]
    return [ModelConfig(model_id=MODELS[n].model_id, origin_file_pattern=pattern)
            for n in names for pattern in MODELS[n].files if pattern != T5_TOKENIZER]


def path_configs(root: Path, key: str) -> list[ModelConfig]:
    """``path=`` the local files: the model's own DiT (shards as a list), shared files from home."""
    name = RELEASES["t2v" if key == "speed" else key]
    shards = sorted(str(p) for p in (root / MODELS[name].model_id).glob(DIT_FILES))
    configs = [ModelConfig(path=shards if len(shards) > 1 else shards[0]),
               ModelConfig(path=str(root / T2V_ID / T5_FILE)), ModelConfig(path=str(root / T2V_ID / VAE_FILE))]
    if MODELS[name].needs_image_encoder:
        configs.append(ModelConfig(path=str(root / I2V_ID / CLIP_FILE)))
    if key == "speed":
        configs.append(ModelConfig(path=str(root / MODELS[SPEED].model_id / MODELS[SPEED].files[0])))
    return configs


def load(root: Path, key: str, how: str) -> WanVideoPipeline:
    if how == "registry":
        return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                                model_configs=registry_configs(key), local_model_path=str(root),
                                                skip_download=True)
    return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                            model_configs=path_configs(root, key),
                                            tokenizer_config=ModelConfig(path=str(root / T2V_ID / T5_TOKENIZER)),
                                            local_model_path=str(root / "nowhere"), skip_download=True)


@pytest.fixture(scope="module")
def pipes(models_root) -> Callable[..., WanVideoPipeline]:
    """``pipes(key, how="registry" | "path")``: each pipeline is loaded once per module."""
    cache: dict[tuple[str, str], WanVideoPipeline] = {}

    def get(key: str, how: str = "registry") -> WanVideoPipeline:
        if (key, how) not in cache:
            cache[key, how] = load(models_root, key, how)
        return cache[key, how]

    return get


def generate(pipe: WanVideoPipeline, prompt: str = "a red cat running", **kwargs: Any):
    kwargs = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES, "num_inference_steps": STEPS, "seed": 0,
              "negative_prompt": "blurry", "progress_bar_cmd": lambda x: x, **kwargs}
    return pipe(prompt, **kwargs)


def latents(pipe: WanVideoPipeline, **kwargs: Any) -> torch.Tensor:
    return generate(pipe, output_type="latent", **kwargs)


def mode(pipes, name: str, frames: int = FRAMES) -> tuple[WanVideoPipeline, dict[str, Any]]:
    key, inputs = MODES[name]
    return pipes(key), inputs(frames)


def check_frames(frames, count: int = FRAMES, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    assert isinstance(frames, list) and len(frames) == count
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" and f.size == size for f in frames)


def raised_by_us(excinfo: pytest.ExceptionInfo) -> None:
    """The error comes from wan_runtime / wan_models code, not from inside torch."""
    where = traceback.extract_tb(excinfo.tb)[-1].filename
    assert "wan_runtime" in where or "wan_models" in where, f"raised in {where}"


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("key", [*RELEASES, "speed"])
def test_path_and_registry_configs_load_the_same_networks(pipes, key: str) -> None:
    by_path, by_id = pipes(key, "path"), pipes(key, "registry")
    for slot in ("dit", "vae", "text_encoder", "image_encoder", "motion_controller"):
        a, b = getattr(by_path, slot), getattr(by_id, slot)
        assert (a is None) == (b is None), slot
        if a is not None:
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), slot
    spec = MODELS[RELEASES["t2v" if key == "speed" else key]]
    assert by_id.dit.config.in_dim == spec.config.in_dim
    assert (by_id.image_encoder is not None) == spec.needs_image_encoder
    assert (by_id.motion_controller is not None) == (key == "speed")
    assert by_id.prompter is not None and by_path.prompter is not None


def test_path_and_registry_pipelines_generate_the_same_video(pipes) -> None:
    inputs = MODES["fun_reference"][1](FRAMES)
    a = generate(pipes("reference", "path"), **inputs)
    b = generate(pipes("reference", "registry"), **inputs)
    assert np.array_equal(pixels(a), pixels(b))


def test_shared_files_are_missing_without_the_redirect(models_root) -> None:
    name = RELEASES["flf2v"]
    with pytest.raises(ModelFilesMissing) as excinfo:
        WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                         model_configs=registry_configs("flf2v"), local_model_path=str(models_root),
                                         skip_download=True, redirect_common_files=False)
    message = str(excinfo.value)
    assert f"model files of {MODELS[name].model_id} missing: {T5_FILE}" in message
    assert str(models_root / MODELS[name].model_id) in message and "skip_download=True" in message
    assert f"modelscope download --model {MODELS[name].model_id} --include {T5_FILE}" in message
    assert excinfo.value.missing == [T5_FILE]


def test_missing_model_files_say_what_and_where(models_root, tmp_path) -> None:
    absent = tmp_path / "nope" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelFilesMissing, match="model path\\(s\\) not found: .*nope.*downloads nothing"):
        WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                         model_configs=[ModelConfig(path=str(absent))])
    with pytest.raises(ModelFilesMissing) as excinfo:
        WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                         model_configs=registry_configs("speed"), local_model_path=str(tmp_path),
                                         skip_download=True)
    message = str(excinfo.value)
    assert f"model files of {T2V_ID} missing: {DIT_FILES}" in message
    assert f"looked in: {tmp_path / T2V_ID}" in message and "modelscope download" in message


# --------------------------------------------------------------------------- every mode


@pytest.mark.parametrize("name", list(MODES))
def test_mode_generates_frames_deterministically(pipes, name: str) -> None:
    pipe, inputs = mode(pipes, name)
    first = generate(pipe, **inputs)
    check_frames(first)
    assert np.array_equal(pixels(first), pixels(generate(pipe, **inputs))), "same seed, other frames"
    assert not np.array_equal(pixels(first), pixels(generate(pipe, seed=1, **inputs))), "other seed, same frames"


# (release, inputs, other inputs): each pair must give different latents.
CHANGES = {
    "prompt": ("t2v", dict(prompt="a red cat"), dict(prompt="a blue bird flying")),
    "negative_prompt": ("t2v", dict(negative_prompt="blurry"), dict(negative_prompt="dark night")),
    "i2v input_image": ("i2v", dict(input_image=picture(1)), dict(input_image=picture(2))),
    "flf2v end_image": ("flf2v", dict(input_image=picture(1), end_image=picture(2)),
                        dict(input_image=picture(1), end_image=picture(3))),
    "v2v input_video": ("t2v", dict(input_video=video(3), denoising_strength=0.6),
                        dict(input_video=video(4), denoising_strength=0.6)),
    "v2v denoising_strength": ("t2v", dict(input_video=video(3), denoising_strength=0.6),
                               dict(input_video=video(3), denoising_strength=0.9)),
    "v2v vs t2v": ("t2v", dict(), dict(input_video=video(3), denoising_strength=0.6)),
    "fun_inp end_image": ("inp", dict(input_image=picture(1)), dict(input_image=picture(1), end_image=picture(2))),
    "fun_control control_video": ("control", dict(control_video=video(4)), dict(control_video=video(5))),
    "fun_control input_image": ("control", dict(control_video=video(4)),
                                dict(control_video=video(4), input_image=picture(1))),
    "fun_reference reference_image": ("reference", dict(control_video=video(4)),
                                      dict(control_video=video(4), reference_image=picture(5))),
    "camera left/right": ("camera", dict(input_image=picture(1), camera_control_direction="Left"),
                          dict(input_image=picture(1), camera_control_direction="Right")),
    "camera up/down": ("camera", dict(input_image=picture(1), camera_control_direction="Up"),
                       dict(input_image=picture(1), camera_control_direction="Down")),
    "camera speed": ("camera", dict(input_image=picture(1), camera_control_direction="Left"),
                     dict(input_image=picture(1), camera_control_direction="Left", camera_control_speed=0.1)),
    "camera input_image": ("camera", dict(input_image=picture(1), camera_control_direction="Left"),
                           dict(input_image=picture(2), camera_control_direction="Left")),
    "vace vace_video": ("vace", dict(), dict(vace_video=video(6))),
    "vace vace_video_mask": ("vace", dict(vace_video=video(6), vace_video_mask=mask(left=True)),
                             dict(vace_video=video(6), vace_video_mask=mask(left=False))),
    "vace reference": ("vace", dict(vace_video=video(6)), dict(vace_video=video(6), vace_reference_image=picture(7))),
    "vace vace_scale": ("vace", dict(vace_video=video(6)), dict(vace_video=video(6), vace_scale=0.5)),
    "speed motion_bucket_id": ("speed", dict(motion_bucket_id=10), dict(motion_bucket_id=90)),
    "speed vs none": ("speed", dict(), dict(motion_bucket_id=10)),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_each_input_changes_the_output(pipes, case: str) -> None:
    key, inputs, other = CHANGES[case]
    a, b = latents(pipes(key), **inputs), latents(pipes(key), **other)
    assert a.shape == b.shape == LATENTS
    assert (a - b).abs().max() > 1e-3


CFG_MERGE_ATOL = 1e-4  # float32; batching both branches changes summation order (measured ~6e-6)


@pytest.mark.parametrize("name", list(MODES))
def test_cfg_merge_matches_separate_branches(pipes, name: str) -> None:
    pipe, inputs = mode(pipes, name)
    separate, merged = latents(pipe, **inputs), latents(pipe, cfg_merge=True, **inputs)
    torch.testing.assert_close(merged, separate, atol=CFG_MERGE_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["t2v", "fun_control", "camera_left", "vace_all", "speed"])
def test_sliding_windows(pipes, name: str) -> None:
    pipe, inputs = mode(pipes, name, frames=9)  # 3 latent frames: windows of 2 every 1
    frames = generate(pipe, num_frames=9, sliding_window_size=2, sliding_window_stride=1, cfg_merge=True, **inputs)
    check_frames(frames, count=9)
    whole = latents(pipe, num_frames=9, **inputs)
    # A window at least as long as the latents (3 frames, 4 with a VACE reference) is the plain call.
    one_window = latents(pipe, num_frames=9, sliding_window_size=4, sliding_window_stride=1, **inputs)
    assert torch.equal(one_window, whole)
    windowed = latents(pipe, num_frames=9, sliding_window_size=2, sliding_window_stride=1, **inputs)
    assert windowed.shape == whole.shape and not torch.allclose(windowed, whole)


@pytest.mark.parametrize("sampler", ["unipc", "dpmpp"])
@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_samplers(pipes, sampler: str, name: str) -> None:
    pipe, inputs = mode(pipes, name)
    frames = generate(pipe, sampler=sampler, num_inference_steps=3, **inputs)
    check_frames(frames)
    assert np.array_equal(pixels(frames), pixels(generate(pipe, sampler=sampler, num_inference_steps=3, **inputs)))
    euler = generate(pipe, num_inference_steps=3, **inputs)
    assert not np.array_equal(pixels(frames), pixels(euler))


@pytest.mark.parametrize("name", ["t2v", "i2v", "vace_video_mask", "speed"])
def test_teacache_skips_steps_and_reports_them(pipes, name: str, caplog) -> None:
    pipe, inputs = mode(pipes, name)
    with caplog.at_level(logging.INFO, logger="wan_runtime.pipeline"):
        frames = generate(pipe, num_inference_steps=5, **TEACACHE, **inputs)
    check_frames(frames)
    assert len(pipe.step_cache_skips) == 2  # one cache per CFG branch
    for skipped in pipe.step_cache_skips:
        assert len(skipped) == 5 and not skipped[0] and not skipped[-1] and any(skipped)
    assert any("TeaCache skipped" in r.getMessage() and "of 5 steps" in r.getMessage() for r in caplog.records)
    plain = latents(pipe, num_inference_steps=5, **inputs)
    assert pipe.step_cache_skips is None  # a call without TeaCache reports none
    cached = latents(pipe, num_inference_steps=5, cfg_merge=True, **TEACACHE, **inputs)  # merge falls back
    assert cached.shape == plain.shape and not torch.equal(cached, plain)


def test_progress_bar_and_step_callback_see_every_step(pipes) -> None:
    seen: list = []
    steps: list[tuple[int, float, tuple]] = []

    def bar(timesteps):
        seen.append(len(timesteps))
        return timesteps

    out = latents(pipes("t2v"), num_inference_steps=3, progress_bar_cmd=bar,
                  step_callback=lambda i, t, x: steps.append((i, float(t), tuple(x.shape))))
    assert seen == [3] and [s[0] for s in steps] == [0, 1, 2]
    assert steps[0][1] > steps[1][1] > steps[2][1] and all(s[2] == LATENTS for s in steps)
    assert out.shape == LATENTS
    check_frames(generate(pipes("t2v"), progress_bar_cmd=tqdm))  # the default bar works too


def test_latents_decode_to_the_same_frames(pipes) -> None:
    pipe = pipes("t2v")
    lat = latents(pipe)
    request = GenerationRequest(height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    decoded, generated = pixels(pipe.decode(lat, request)).astype(int), pixels(generate(pipe)).astype(int)
    # The latents repeat exactly; oneDNN/MKL float32 convolutions are not bit-reproducible across calls
    # (buffer alignment), which can flip a rounding boundary: seen once, 1 level in 1 of 23040 values.
    assert np.abs(decoded - generated).max() <= 1 and (decoded != generated).mean() < 1e-3


def test_prompt_embeds_stand_in_for_the_text_encoder(pipes) -> None:
    pipe = pipes("t2v")
    embeds = pipe.prompter.encode("a red cat", device=pipe.device)
    negative = pipe.prompter.encode("blurry", device=pipe.device)
    given = latents(pipe, prompt="ignored", prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert torch.equal(given, latents(pipe, prompt="a red cat", negative_prompt="blurry"))


def test_input_video_at_full_strength_only_sets_the_size(pipes) -> None:
    pipe = pipes("t2v")
    for sampler in ("euler", "unipc", "dpmpp"):
        assert torch.equal(latents(pipe, sampler=sampler, input_video=video(3)), latents(pipe, sampler=sampler))


def test_zero_denoising_strength_keeps_the_input_video_latents(pipes) -> None:
    pipe = pipes("t2v")
    frames = video(3)
    out = latents(pipe, input_video=frames, denoising_strength=0.0)
    request = GenerationRequest(height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    with torch.no_grad():
        encoded = pipe.encode_video(video_to_tensor(frames), request)
    assert torch.equal(out, encoded)


def test_vace_reference_frame_is_dropped_from_the_output(pipes) -> None:
    pipe, inputs = mode(pipes, "vace_all")
    assert latents(pipe, **inputs).shape == LATENTS
    v2v = generate(pipe, input_video=video(3), denoising_strength=0.7, **inputs)  # video-to-video with a reference
    check_frames(v2v)


def test_save_video_reads_back_with_pyav(pipes, tmp_path) -> None:
    pipe, inputs = mode(pipes, "i2v")
    frames = generate(pipe, num_frames=9, **inputs)
    path = save_video(frames, tmp_path / "out" / "i2v.mp4", fps=8, quality=9)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(video=0))
        assert stream.codec_context.name == "h264"
    assert len(decoded) == 9 and all((f.width, f.height) == (WIDTH, HEIGHT) for f in decoded)
    loaded = load_video(path)  # and the file is a valid input video
    check_frames(generate(pipes("t2v"), num_frames=9, input_video=loaded, denoising_strength=0.5), count=9)


# --------------------------------------------------------------------------- rounding


def test_frame_count_is_rounded_to_4k_plus_1_with_a_warning(pipes, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="wan_runtime.request"):
        frames = generate(pipes("t2v"), num_frames=6)
    check_frames(frames, count=9)
    assert "num_frames=6 is not of the form 4k+1; rounded up to 9" in caplog.text


def test_size_is_rounded_to_multiples_of_16_with_a_warning(pipes, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="wan_runtime.request"):
        frames = generate(pipes("i2v"), height=30, width=40, input_image=picture(1))
    check_frames(frames, size=(48, 32))
    assert "height=30 is not a multiple of 16; rounded up to 32" in caplog.text
    assert "width=40 is not a multiple of 16; rounded up to 48" in caplog.text


def test_rounding_follows_the_loaded_vae_and_patch(caplog) -> None:
    """TI2V-5B's VAE compresses 16x in space and its DiT patches 2x2: sizes round to 32, not 16."""
    from wan_models.vae22 import VAE22Config, WanVAE22

    from factories import TINY_DIT, meta_dit
    from wan_runtime import WanVideoPipeline
    from wan_runtime.request import GenerationRequest

    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    assert pipe.shape_multiples == (16, 4)
    with torch.device("meta"):
        pipe.vae = WanVAE22(VAE22Config(dim=4, dec_dim=5))
    pipe.dit = meta_dit(TINY_DIT.replace(in_dim=48, out_dim=48, family="wan2.2"))
    assert pipe.shape_multiples == (32, 4)
    with caplog.at_level(logging.WARNING, logger="wan_runtime.request"):
        request = GenerationRequest(height=480, width=848, num_frames=121, shape_multiples=pipe.shape_multiples)
    assert (request.height, request.width, request.num_frames) == (480, 864, 121)
    assert "width=848 is not a multiple of 32; rounded up to 864" in caplog.text


# --------------------------------------------------------------------------- bad input

BAD_INPUT = [
    # wrong sizes and lengths of videos
    ("control", dict(control_video=video(4, size=(40, 24))), ValueError,
     r"control_video frames are \(40, 24\), expected \(width, height\) = \(48, 32\)"),
    ("control", dict(control_video=video(4, frames=3)), ValueError,
     "control_video has 3 frames, but num_frames is 5; trim the video to 4k\\+1 frames \\(e.g. 1\\)"),
    ("control", dict(control_video=video(4, frames=9)), ValueError,
     "control_video has 9 frames, but num_frames is 5; pass num_frames=9"),
    ("vace", dict(vace_video=video(6, size=(40, 24))), ValueError, r"vace_video frames are \(40, 24\)"),
    ("vace", dict(vace_video=video(6), vace_video_mask=mask(frames=9)), ValueError,
     "vace_video_mask has 9 frames, but num_frames is 5"),
    ("vace", dict(vace_reference_image=picture(7, size=(40, 24))), ValueError,
     r"vace_reference_image is \(40, 24\), expected \(width, height\) = \(48, 32\)"),
    ("t2v", dict(input_video=video(3, size=(64, 32)), denoising_strength=0.5), ValueError,
     r"input_video frames are \(64, 32\)"),
    # an image (or a path, or an array) where a video is expected, and the reverse
    ("control", dict(control_video=picture(4)), TypeError,
     "control_video must be a list of frames, got a single image"),
    ("t2v", dict(input_video=picture(3), denoising_strength=0.5), TypeError, "input_video must be a list of frames"),
    ("vace", dict(vace_video=picture(6)), TypeError, "vace_video must be a list of frames"),
    ("vace", dict(vace_video_mask=picture(6)), TypeError, "vace_video_mask must be a list of frames"),
    ("control", dict(control_video="clip.mp4"), TypeError, "control_video must be a list of PIL frames, got the path"),
    ("control", dict(control_video=np.zeros((HEIGHT, WIDTH, 3), np.uint8)), TypeError,
     "control_video must be a list of PIL frames; frame 0 is a ndarray"),
    ("i2v", dict(input_image=video(1)), TypeError, "input_image must be one PIL image, got a sequence"),
    ("flf2v", dict(input_image=picture(1), end_image=video(2)), TypeError, "end_image must be one PIL image"),
    ("reference", dict(control_video=video(4), reference_image=video(5)), TypeError, "reference_image must be one"),
    ("vace", dict(vace_reference_image=video(7)), TypeError, "vace_reference_image must be one PIL image"),
    # numbers out of range
    ("t2v", dict(input_video=video(3), denoising_strength=-0.1), ValueError,
     r"denoising_strength must be in \[0, 1\], got -0.1"),
    ("t2v", dict(input_video=video(3), denoising_strength=1.5), ValueError,
     r"denoising_strength must be in \[0, 1\], got 1.5"),
    ("t2v", dict(num_frames=0), ValueError, "num_frames must be a positive integer, got 0"),
    ("t2v", dict(seed="1"), ValueError, "seed must be an integer or None"),
    ("t2v", dict(sliding_window_size=2), ValueError, "sliding_window_size and sliding_window_stride go together"),
    # inputs the loaded models cannot use, or models missing their input
    ("camera", dict(input_image=picture(1), camera_control_direction="Sideways"), ValueError,
     "unknown camera_control_direction 'Sideways'; choose one of \\['Left'"),
    ("t2v", dict(control_video=video(4)), ValueError, "control_video needs a PAI Fun Control DiT"),
    ("t2v", dict(motion_bucket_id=10), ValueError, "motion_bucket_id needs the speed-control motion controller"),
    ("t2v", dict(input_image=picture(1)), ValueError, "the loaded t2v DiT has no image input"),
    ("t2v", dict(vace_video=video(6)), ValueError, "need a VACE model"),
    ("i2v", dict(input_image=picture(1), camera_control_direction="Left"), ValueError,
     "camera_control_direction needs a PAI Fun Control-Camera DiT"),
    ("control", dict(control_video=video(4), reference_image=picture(5)), ValueError,
     "reference_image needs a PAI Fun V1.1 Control DiT"),
    ("i2v", dict(), ValueError, "the loaded i2v DiT is image-conditioned: pass input_image$"),
    ("inp", dict(end_image=picture(2)), ValueError, "end_image needs input_image"),
    ("flf2v", dict(input_image=picture(1)), ValueError, "the loaded FLF2V DiT .* pass end_image"),
    ("control", dict(), ValueError, "the loaded fun-control DiT is image-conditioned: pass control_video$"),
    ("reference", dict(reference_image=picture(5)), ValueError, "pass control_video$"),
    ("camera", dict(), ValueError, "pass input_image and camera_control_direction$"),
    ("camera", dict(input_image=picture(1)), ValueError, "needs camera_control_direction with input_image"),
    ("camera", dict(camera_control_direction="Up"), ValueError, "pass input_image with camera_control_direction"),
    # options
    ("t2v", dict(sampler="ddim"), ValueError, "unknown sampler 'ddim'"),
    ("t2v", dict(sampler="unipc", input_video=video(3), denoising_strength=0.6), ValueError, "needs sampler='euler'"),
    ("t2v", dict(tea_cache_l1_thresh=0.1), ValueError, "no TeaCache coefficients for model id ''"),
    ("t2v", dict(num_frames=9, sliding_window_size=2, sliding_window_stride=1, **TEACACHE), ValueError,
     "step caches .* and sliding windows cannot be combined"),
    ("t2v", dict(output_type="np"), ValueError, "output_type must be 'pil' or 'latent'"),
    ("t2v", dict(prompt_embeds=torch.zeros(1, 8, 7)), ValueError, r"context must be \[B, L, 32\]"),
    ("t2v", dict(num_frame=5), TypeError, r"unknown arguments \['num_frame'\]"),
    ("t2v", dict(extra={}), TypeError, r"unknown arguments \['extra'\]"),
]


@pytest.mark.parametrize("key, kwargs, error, message", BAD_INPUT,
                         ids=[f"{k}-{'-'.join(kw)}-{i}" for i, (k, kw, _, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_a_clear_error(pipes, key: str, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as excinfo:
        generate(pipes(key), **kwargs)
    raised_by_us(excinfo)
