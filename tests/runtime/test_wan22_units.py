"""Wan 2.2 conditioning: TI2V-5B text- and image-to-video (image latents in frame 0, held fixed, timestep 0
on its tokens) against a loop written out from the official one, I2V-A14B's ``y`` without CLIP, video to
video with the 48-channel VAE, per-token timesteps in sliding windows, and the inputs these models refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wan_models.configs import VAE22_FILE, VAE_FILE
from wan_runtime import WanVideoPipeline, tiny_release
from wan_runtime.denoise import predict_windows
from wan_runtime.request import GenerationRequest
from wan_runtime.units.image import image_pixels

from factories import load_tiny_pipeline, one_thread_fixture

one_thread = one_thread_fixture("module")
TI2V, T2V_A14B, I2V_A14B = "Wan2.2-TI2V-5B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B"
SIZE = dict(height=32, width=64, num_frames=5)
SAMPLING = dict(prompt="a red cat", negative_prompt="blurry", seed=3, num_inference_steps=3, sampler="euler",
                sigma_shift=5.0, cfg_scale=5.0)
EXPERTS = ("high_noise_model", "low_noise_model")


def picture(seed: int, size: tuple[int, int] = (64, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for model in (TI2V, T2V_A14B, I2V_A14B):
        tiny_release.write_release(root, model)
    return root / "Wan-AI"


def load(dits: list[Path], vae: Path) -> WanVideoPipeline:
    return load_tiny_pipeline(vae.parent, dits, vae.name)


@pytest.fixture(scope="module")
def ti2v(releases) -> WanVideoPipeline:
    return load([releases / TI2V], releases / TI2V / VAE22_FILE)


@pytest.fixture(scope="module")
def i2v_pair(releases) -> WanVideoPipeline:
    return load([releases / I2V_A14B / e for e in EXPERTS], releases / I2V_A14B / VAE_FILE)


@pytest.fixture(scope="module")
def t2v_pair(releases) -> WanVideoPipeline:
    return load([releases / T2V_A14B / e for e in EXPERTS], releases / T2V_A14B / VAE_FILE)


def call(pipe: WanVideoPipeline, **kwargs):
    args = dict(progress_bar_cmd=lambda x: x, output_type="latent", **SAMPLING, **SIZE)
    return pipe(**{**args, **kwargs})


def request(**kwargs) -> GenerationRequest:
    return GenerationRequest(**{**SAMPLING, **SIZE, **kwargs}, shape_multiples=(32, 4))


@torch.no_grad()
def prepare(pipe: WanVideoPipeline, **kwargs):
    """The pipeline's conditioning, computed as the call computes it (without autograd)."""
    return pipe.prepare(request(**kwargs))


@torch.no_grad()
def image_latents(pipe: WanVideoPipeline, image: Image.Image) -> torch.Tensor:
    """The image resized to the video and encoded on its own: one latent frame."""
    req = request()
    return pipe.encode_video(image_pixels(pipe, req, image, "input_image").unsqueeze(2), req, tiled=False)


# ---- TI2V-5B ------------------------------------------------------------------------------------

def test_ti2v_text_to_video_has_no_token_scale_or_fixup(ti2v) -> None:
    cond = prepare(ti2v)
    assert cond.token_timestep_scale is None and cond.step_fixups == []
    assert cond.latents.shape == (1, 48, 2, 2, 4) and torch.equal(cond.latents, cond.noise)
    frames = call(ti2v, output_type="pil")
    assert len(frames) == 5 and frames[0].size == (64, 32)


def test_ti2v_image_to_video_keeps_the_image_in_frame_0(ti2v) -> None:
    image = picture(1)
    z = image_latents(ti2v, image)
    cond = prepare(ti2v, input_image=image)
    assert torch.equal(cond.latents[:, :, :1], z) and torch.equal(cond.latents[:, :, 1:], cond.noise[:, :, 1:])
    tokens_per_frame = (cond.latents.shape[3] // 2) * (cond.latents.shape[4] // 2)
    scale = cond.token_timestep_scale
    assert scale.shape == (1, 2 * tokens_per_frame)
    assert torch.equal(scale[0, :tokens_per_frame], torch.zeros(tokens_per_frame))
    assert torch.equal(scale[0, tokens_per_frame:], torch.ones(tokens_per_frame))
    assert len(cond.step_fixups) == 1

    out = call(ti2v, input_image=image)
    assert torch.equal(out[:, :, :1], z)
    text_only, other = call(ti2v), call(ti2v, input_image=picture(2))
    assert not torch.allclose(out[:, :, 1:], text_only[:, :, 1:], atol=1e-4)
    assert not torch.allclose(out[:, :, 1:], other[:, :, 1:], atol=1e-4)
    assert len(call(ti2v, input_image=image, output_type="pil")) == 5


def test_ti2v_image_to_video_equals_the_official_loop_written_out(ti2v) -> None:
    """``masks_like(zero=True)``: mask 0 on frame 0; ``latent = (1-mask)*z + mask*latent`` before the loop
    and after every step; per-token ``t = mask[::2, ::2] * t`` flattened."""
    image = picture(1)
    out = call(ti2v, input_image=image)
    cond = prepare(ti2v, input_image=image)
    z = image_latents(ti2v, image)
    mask = torch.ones_like(cond.noise)
    mask[:, :, 0] = 0
    latents = (1 - mask) * z + mask * cond.noise
    torch.testing.assert_close(cond.latents, latents, rtol=0, atol=0)
    with torch.no_grad():
        for t in ti2v.scheduler.timesteps:
            timestep = (mask[0, 0][:, ::2, ::2] * t).flatten().unsqueeze(0)
            pos = ti2v.dit(latents, timestep, **cond.positive)
            neg = ti2v.dit(latents, timestep, **cond.negative)
            latents = ti2v.scheduler.step(neg + 5.0 * (pos - neg), t, latents)
            latents = (1 - mask) * z + mask * latents
    torch.testing.assert_close(out, latents, rtol=0, atol=1e-6)


def test_ti2v_video_to_video(ti2v) -> None:
    video = [picture(10 + i) for i in range(5)]
    cond = prepare(ti2v, input_video=video, denoising_strength=0.6)
    pixels = torch.stack([image_pixels(ti2v, request(), frame, "frame")[0] for frame in video], dim=1)
    with torch.no_grad():
        encoded = ti2v.encode_video(pixels[None], request())
    expected = ti2v.scheduler.add_noise(encoded, cond.noise, ti2v.scheduler.timesteps[0])
    torch.testing.assert_close(cond.latents, expected, rtol=0, atol=1e-6)
    out = call(ti2v, input_video=video, denoising_strength=0.6)
    assert out.shape == (1, 48, 2, 2, 4) and not torch.allclose(out, call(ti2v), atol=1e-4)


def test_ti2v_sliding_windows_cut_the_per_token_timestep(ti2v) -> None:
    image = picture(1)
    out = call(ti2v, input_image=image, num_frames=9, sliding_window_size=2, sliding_window_stride=1)
    assert out.shape[2] == 3 and torch.equal(out[:, :, :1], image_latents(ti2v, image))
    cond = prepare(ti2v, input_image=image, num_frames=9)
    t = cond.token_timestep_scale * 700.0
    with torch.no_grad():
        whole = ti2v.dit(cond.latents, t, **cond.positive)
        torch.testing.assert_close(predict_windows(ti2v.dit, cond.latents, t, cond.positive, 3, 3), whole,
                                   rtol=0, atol=1e-6)
        seen = []

        def recording(x, timestep, **inputs):
            seen.append(timestep)
            return ti2v.dit(x, timestep, **inputs)

        predict_windows(recording, cond.latents, t, cond.positive, 2, 1)
    per_frame = t.shape[1] // 3
    assert [s.shape[1] for s in seen] == [2 * per_frame, 2 * per_frame]
    assert torch.equal(seen[0], t[:, :2 * per_frame]) and torch.equal(seen[1], t[:, per_frame:])


@pytest.mark.parametrize("inputs, message", [
    (dict(input_image=picture(1), end_image=picture(2)), "end_image given, but the loaded wan2.2-ti2v DiT"),
    (dict(control_video=[picture(i) for i in range(5)]), "control_video needs a PAI Fun Control DiT"),
    (dict(reference_image=picture(1)), "reference_image needs a PAI Fun V1.1 Control DiT"),
    (dict(input_image=picture(1), camera_control_direction="Left"), "camera_control_direction needs a PAI Fun"),
    (dict(vace_video=[picture(i) for i in range(5)]), "need a VACE model"),
    (dict(motion_bucket_id=10), "needs a Wan 2.1 DiT"),
    (dict(end_image=picture(2)), "end_image needs input_image"),
])
def test_ti2v_refuses_inputs_it_cannot_take(ti2v, inputs, message) -> None:
    steps = []
    with pytest.raises(ValueError, match=message):
        call(ti2v, step_callback=lambda *a: steps.append(a), **inputs)
    assert steps == []


# ---- the A14B experts -----------------------------------------------------------------------------

def test_i2v_a14b_takes_y_without_clip(i2v_pair) -> None:
    assert i2v_pair.image_encoder is None and i2v_pair.dit2 is not None
    image = picture(1)
    cond = prepare(i2v_pair, input_image=image)
    y = cond.shared["y"]
    assert "clip_feature" not in cond.shared and y.shape == (1, 20, 2, 4, 8)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and not y[:, :4, 1:].any()
    out = call(i2v_pair, input_image=image)
    assert out.shape == (1, 16, 2, 4, 8)
    assert not torch.allclose(out, call(i2v_pair, input_image=picture(2)), atol=1e-4)
    with pytest.raises(ValueError, match="image-conditioned: pass input_image"):
        call(i2v_pair)


def test_i2v_a14b_end_image_goes_into_y_as_diffsynth_does(i2v_pair) -> None:
    cond = prepare(i2v_pair, input_image=picture(1), end_image=picture(2))
    mask = cond.shared["y"][:, :4, -1, 0, 0]
    assert mask.tolist() == [[0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("inputs, message", [
    (dict(input_image=picture(1), control_video=[picture(i) for i in range(5)]), "control_video needs a PAI Fun"),
    (dict(input_image=picture(1), camera_control_direction="Left"), "camera_control_direction needs a PAI Fun"),
    (dict(input_image=picture(1), motion_bucket_id=10), "needs a Wan 2.1 DiT"),
])
def test_i2v_a14b_refuses_inputs_it_cannot_take(i2v_pair, inputs, message) -> None:
    with pytest.raises(ValueError, match=message):
        call(i2v_pair, **inputs)


def test_t2v_a14b_refuses_an_input_image(t2v_pair) -> None:
    with pytest.raises(ValueError, match="input_image given, but the loaded wan2.2-t2v DiT has no image input"):
        call(t2v_pair, input_image=picture(1))


# ---- a VAE that does not fit the DiT ------------------------------------------------------------

@pytest.mark.parametrize("dit, vae, message", [
    (TI2V, I2V_A14B + "/" + VAE_FILE, r"VAE \(WanVAE, 16 latent channels\).*wan2.2-ti2v DiT \(48 latent channels\)"
                                      r": load Wan2.2_VAE.pth"),
    (T2V_A14B + "/high_noise_model", TI2V + "/" + VAE22_FILE,
     r"VAE \(WanVAE22, 48 latent channels\).*wan2.2-t2v DiT \(16 latent channels\): load Wan2.1_VAE.pth"),
])
def test_a_vae_that_does_not_fit_the_dit_is_refused(releases, dit, vae, message) -> None:
    pipe = load([releases / dit], releases / vae)
    with pytest.raises(ValueError, match=message):
        call(pipe, num_inference_steps=1)


def test_ti2v_cfg_merge_batches_the_per_token_timestep(ti2v) -> None:
    """With both CFG branches in one batch the [1, L] timestep goes to [2, L]; same result as two calls."""
    image = picture(5)
    separate = call(ti2v, input_image=image, cfg_scale=4.0)
    merged = call(ti2v, input_image=image, cfg_scale=4.0, cfg_merge=True)
    torch.testing.assert_close(merged, separate, rtol=1e-5, atol=1e-5)
