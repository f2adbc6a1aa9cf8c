"""Behaviour of the conditioning units on tiny random networks: what each input adds to the DiT's
inputs, the layouts beyond the fixtures (resizing, soft masks), and the errors for inputs the loaded
models cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from factories import TINY_DIT, meta_dit, random_dit, random_weights
from wan_models import DiTConfig
from wan_models.clip import CLIPVisionConfig, CLIPVisionTower
from wan_models.vae import VAEConfig, WanVAE
from wan_runtime import WanVideoPipeline
from wan_runtime.images import image_to_tensor
from wan_runtime.request import GenerationRequest
from wan_runtime.units import Conditioning, camera, image
from wan_runtime.units.camera import DIRECTIONS, pack_camera, plucker_embedding

HEIGHT, WIDTH, FRAMES = 32, 48, 9
LATENT_GRID = ((FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
CLIP = CLIPVisionConfig(embed_dim=8, vision_dim=16, vision_heads=2, vision_layers=2)
Z = 16

I2V = TINY_DIT.replace(image_input=True, in_dim=2 * Z + 4, clip_dim=CLIP.vision_dim)
FLF2V = I2V.replace(image_pos_emb=True)
CONTROL = I2V.replace(in_dim=3 * Z, ref_conv=True)
CAMERA = I2V.replace(in_dim=2 * Z, camera_in_dim=24)
VACE = TINY_DIT.replace(vace_layers=(0,))


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    module.load_state_dict(random_weights(module, seed), assign=True)
    return module.eval()


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    with torch.device("meta"):
        model = WanVAE(VAEConfig(dim=4, z_dim=Z))
    return _random(model, 3)


@pytest.fixture(scope="module")
def clip() -> CLIPVisionTower:
    with torch.device("meta"):
        model = CLIPVisionTower(CLIP)
    return _random(model, 4)


def _pipe(config: DiTConfig, vae: WanVAE | None, clip: CLIPVisionTower | None = None) -> WanVideoPipeline:
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.add_model(meta_dit(config))
    for module in (vae, clip):
        if module is not None:
            pipe.add_model(module)
    return pipe


def _picture(seed: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _video(seed: int, frames: int = FRAMES, size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Image.Image]:
    return [_picture(seed * 1000 + i, size) for i in range(frames)]


def _prepare(pipe: WanVideoPipeline, **kwargs) -> Conditioning:
    context = torch.zeros(1, pipe.dit.config.text_len, pipe.dit.config.text_dim)
    request = GenerationRequest(height=HEIGHT, width=WIDTH, num_frames=FRAMES, seed=0, cfg_scale=1.0,
                                num_inference_steps=1, extra={"prompt_embeds": context}, **kwargs)
    with torch.no_grad():
        return pipe.prepare(request)


# --- image (I2V / FLF2V / Fun InP) -----------------------------------------------------------


def test_frame_mask_layout() -> None:
    mask = image.frame_mask(FRAMES, has_end=True, height=2, width=3)
    assert mask.shape == (1, 4, LATENT_GRID[0], 2, 3)
    per_frame = mask[0, :, :, 0, 0]
    assert torch.equal(per_frame[:, 0], torch.ones(4))
    assert torch.equal(per_frame[:, -1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert per_frame[:, 1:-1].sum() == 0
    assert image.frame_mask(FRAMES, has_end=False, height=1, width=1)[:, :, 1:].sum() == 0


def test_i2v_sets_y_and_clip_feature_from_the_image(vae, clip) -> None:
    pipe = _pipe(I2V, vae, clip)
    cond = _prepare(pipe, input_image=_picture(1))
    assert cond.shared["y"].shape == (1, 4 + Z, *LATENT_GRID)
    assert cond.shared["clip_feature"].shape == (1, CLIP.num_tokens, CLIP.vision_dim)
    assert torch.equal(cond.shared["y"][:, :4], image.frame_mask(FRAMES, False, *LATENT_GRID[1:]))
    other = _prepare(pipe, input_image=_picture(2))
    assert not torch.allclose(other.shared["y"][:, 4:], cond.shared["y"][:, 4:])
    assert not torch.allclose(other.shared["clip_feature"], cond.shared["clip_feature"])
    assert not any(k in cond.shared for k in ("camera", "vace_context", "reference_latents"))


def test_input_image_is_resized_to_the_video_size_with_pillow_bicubic(vae, clip) -> None:
    pipe = _pipe(I2V, vae, clip)
    big = _picture(5, size=(77, 41))
    resized = _prepare(pipe, input_image=big)
    given = _prepare(pipe, input_image=big.resize((WIDTH, HEIGHT), Image.BICUBIC))
    for key in ("y", "clip_feature"):
        assert torch.equal(resized.shared[key], given.shared[key])


def test_first_last_frame_appends_end_features_only_with_image_pos_emb(vae, clip) -> None:
    first, last = _picture(1), _picture(2)
    flf2v = _prepare(_pipe(FLF2V, vae, clip), input_image=first, end_image=last)
    inp = _prepare(_pipe(I2V, vae, clip), input_image=first, end_image=last)
    only_first = _prepare(_pipe(I2V, vae, clip), input_image=first)
    assert flf2v.shared["clip_feature"].shape[1] == 2 * CLIP.num_tokens
    assert torch.equal(flf2v.shared["clip_feature"][:, :CLIP.num_tokens], only_first.shared["clip_feature"])
    assert torch.equal(inp.shared["clip_feature"], only_first.shared["clip_feature"])
    assert torch.equal(flf2v.shared["y"], inp.shared["y"])
    assert torch.equal(inp.shared["y"][:, :4], image.frame_mask(FRAMES, True, *LATENT_GRID[1:]))
    assert not torch.allclose(inp.shared["y"][:, 4:, -1], only_first.shared["y"][:, 4:, -1])


def test_no_input_image_leaves_the_dit_inputs_alone(vae, clip) -> None:
    cond = _prepare(_pipe(I2V, vae, clip))
    assert cond.shared == {}


@pytest.mark.parametrize("config, kwargs, message", [
    (TINY_DIT, {"input_image": "first"}, "has no image input"),
    (VACE, {"input_image": "first", "end_image": "last"}, "input_image and end_image given"),
    (I2V, {"end_image": "last"}, "end_image needs input_image"),
    (CAMERA, {"input_image": "first", "end_image": "last", "camera_control_direction": "Left"},
     "not supported by Control-Camera"),
])
def test_image_input_errors(vae, clip, config, kwargs, message) -> None:
    images = {"first": _picture(1), "last": _picture(2)}
    with pytest.raises(ValueError, match=message):
        _prepare(_pipe(config, vae, clip), **{k: images.get(v, v) for k, v in kwargs.items()})


def test_image_input_needs_the_image_encoder_and_the_vae(vae, clip) -> None:
    with pytest.raises(ValueError, match="CLIP image encoder"):
        _prepare(_pipe(I2V, vae, None), input_image=_picture(1))
    with pytest.raises(ValueError, match="VAE"):
        _prepare(_pipe(I2V, None, clip), input_image=_picture(1))


# --- Fun control and reference ----------------------------------------------------------------


def test_control_video_packs_control_and_image_latents(vae, clip) -> None:
    control = _video(3)
    with_image = _prepare(_pipe(CONTROL, vae, clip), control_video=control, input_image=_picture(1))
    without = _prepare(_pipe(CONTROL, vae, clip), control_video=control)
    i2v = _prepare(_pipe(I2V, vae, clip), input_image=_picture(1))
    assert with_image.shared["y"].shape == (1, 2 * Z, *LATENT_GRID)
    assert torch.equal(with_image.shared["y"][:, Z:], i2v.shared["y"][:, 4:])
    assert torch.equal(with_image.shared["clip_feature"], i2v.shared["clip_feature"])
    assert torch.equal(with_image.shared["y"][:, :Z], without.shared["y"][:, :Z])
    assert without.shared["y"][:, Z:].abs().sum() == 0
    assert torch.equal(without.shared["clip_feature"], torch.zeros(1, 257, CONTROL.clip_dim))
    other = _prepare(_pipe(CONTROL, vae, clip), control_video=_video(4))
    assert not torch.allclose(other.shared["y"][:, :Z], without.shared["y"][:, :Z])


def test_reference_image_sets_reference_latents_and_replaces_clip_feature(vae, clip) -> None:
    pipe = _pipe(CONTROL, vae, clip)
    cond = _prepare(pipe, control_video=_video(3), input_image=_picture(1), reference_image=_picture(7))
    reference_only = _prepare(_pipe(I2V, vae, clip), input_image=_picture(7))
    assert cond.shared["reference_latents"].shape == (1, Z, 1, *LATENT_GRID[1:])
    assert torch.equal(cond.shared["clip_feature"], reference_only.shared["clip_feature"])
    assert torch.allclose(cond.shared["reference_latents"][:, :, 0], reference_only.shared["y"][:, 4:, 0],
                          atol=1e-5)


@pytest.mark.parametrize("config, kwargs, message", [
    (I2V, {"control_video": _video(3)}, "needs a PAI Fun Control DiT"),
    (CONTROL, {"control_video": _video(3, frames=5)}, "has 5 frames, but num_frames is 9"),
    (CONTROL, {"control_video": _video(3, size=(64, 32))}, "expected \\(width, height\\) = \\(48, 32\\)"),
    (CONTROL, {"input_image": _picture(1)}, "only together with control_video"),
    (I2V, {"input_image": _picture(1), "reference_image": _picture(2)}, "needs a PAI Fun V1.1 Control DiT"),
])
def test_control_errors(vae, clip, config, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _prepare(_pipe(config, vae, clip), **kwargs)


# --- camera -----------------------------------------------------------------------------------


def test_camera_presets_give_distinct_embeddings() -> None:
    embeddings = {d: plucker_embedding(d, 5, 16, 24) for d in DIRECTIONS}
    for d, e in embeddings.items():
        assert e.shape == (5, 16, 24, 6)
        assert torch.allclose(e[0], embeddings["Left"][0]), "frame 0 is the reference pose for every preset"
        # Camera-space rays are unit vectors; later frames are not, since the presets shear the pose
        # (they add to w2c[0, 2] / w2c[1, 2], as the reference does) instead of rotating it.
        assert torch.allclose(e[0, ..., 3:].norm(dim=-1), torch.ones(16, 24))
    names = list(embeddings)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(embeddings[a], embeddings[b]), (a, b)
    still = plucker_embedding("Left", 5, 16, 24, speed=0.0)
    assert torch.allclose(still, still[:1].expand_as(still))


def test_camera_packing_folds_four_frames_into_channels() -> None:
    plucker = torch.arange(9 * 2 * 3 * 6, dtype=torch.float32).view(9, 2, 3, 6)
    packed = pack_camera(plucker)
    assert packed.shape == (1, 24, 3, 2, 3)
    for c in range(6):
        for k in range(4):
            assert torch.equal(packed[0, 4 * c + k, 0], plucker[0, ..., c])
            assert torch.equal(packed[0, 4 * c + k, 1], plucker[1 + k, ..., c])


def test_camera_control_sets_camera_and_first_frame_y(vae, clip) -> None:
    pipe = _pipe(CAMERA, vae, clip)
    cond = _prepare(pipe, input_image=_picture(1), camera_control_direction="RightDown")
    assert cond.shared["camera"].shape == (1, 24, LATENT_GRID[0], HEIGHT, WIDTH)
    assert cond.shared["y"].shape == (1, Z, *LATENT_GRID)
    assert cond.shared["y"][:, :, 1:].abs().sum() == 0 and cond.shared["y"][:, :, 0].abs().sum() > 0
    assert cond.shared["clip_feature"].shape == (1, CLIP.num_tokens, CLIP.vision_dim)
    up = _prepare(pipe, input_image=_picture(1), camera_control_direction="Up")
    assert not torch.allclose(up.shared["camera"], cond.shared["camera"])
    assert torch.equal(up.shared["y"], cond.shared["y"])


@pytest.mark.parametrize("config, kwargs, message", [
    (CAMERA, {"input_image": True, "camera_control_direction": "Sideways"},
     "unknown camera_control_direction 'Sideways'; choose one of \\['Left', 'Right', 'Up', 'Down', 'LeftUp'"),
    (I2V, {"input_image": True, "camera_control_direction": "Left"}, "has none"),
    (CAMERA, {"camera_control_direction": "Left"}, "pass input_image"),
    (CAMERA, {"input_image": True}, "needs camera_control_direction"),
])
def test_camera_errors(vae, clip, config, kwargs, message) -> None:
    kwargs = {k: _picture(1) if v is True else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        _prepare(_pipe(config, vae, clip), **kwargs)


def test_camera_origin_must_be_a_full_pose_entry() -> None:
    with pytest.raises(ValueError, match="19 numbers"):
        camera.plucker_embedding("Left", 5, 16, 16, origin=(0, 0.5, 0.5))


# --- VACE -------------------------------------------------------------------------------------


def test_vace_without_inputs_does_nothing(vae) -> None:
    cond = _prepare(_pipe(VACE, vae))
    assert cond.shared == {} and cond.leading_frames_to_drop == 0
    assert cond.latents.shape == (1, Z, *LATENT_GRID)


def test_vace_context_from_video_mask_and_reference(vae) -> None:
    pipe = _pipe(VACE, vae)
    video, mask = _video(3), _video(4)
    cond = _prepare(pipe, vace_video=video, vace_video_mask=mask, vace_scale=0.7)
    assert cond.shared["vace_context"].shape == (1, 96, *LATENT_GRID)
    assert cond.shared["vace_scale"] == 0.7
    # Soft mask values pass through as pixel / 255: latent cell (0, 0), channel 0 = pixel (0, 0).
    frame = int(0.5 * FRAMES / LATENT_GRID[0])
    assert cond.shared["vace_context"][0, 2 * Z, 0, 0, 0] == image_to_tensor(mask[frame], 0, 1)[0, 0, 0]
    with_ref = _prepare(pipe, vace_video=video, vace_video_mask=mask, vace_reference_image=_picture(9))
    assert with_ref.leading_frames_to_drop == 1
    assert with_ref.latents.shape[2] == with_ref.shared["vace_context"].shape[2] == LATENT_GRID[0] + 1
    assert torch.equal(with_ref.shared["vace_context"][:, :, 1:], cond.shared["vace_context"])
    assert with_ref.shared["vace_context"][:, Z:, 0].abs().sum() == 0
    assert with_ref.shared["vace_context"][:, :Z, 0].abs().sum() > 0


def test_vace_defaults_zero_video_and_full_mask(vae) -> None:
    cond = _prepare(_pipe(VACE, vae), vace_reference_image=_picture(9))
    context = cond.shared["vace_context"]
    assert torch.equal(context[:, 2 * Z:, 1:], torch.ones_like(context[:, 2 * Z:, 1:]))
    assert torch.equal(context[:, :Z, 1:], context[:, Z:2 * Z, 1:]), "both halves encode the same zero video"


@pytest.mark.parametrize("kwargs, message", [
    ({"vace_video": _video(3)}, "has no VACE blocks"),
    ({"vace_reference_image": _picture(1)}, "has no VACE blocks"),
])
def test_vace_needs_a_vace_dit(vae, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _prepare(_pipe(TINY_DIT, vae), **kwargs)


def test_vace_reference_must_match_the_video_size(vae) -> None:
    with pytest.raises(ValueError, match="vace_reference_image is \\(64, 32\\)"):
        _prepare(_pipe(VACE, vae), vace_reference_image=_picture(1, size=(64, 32)))


# --- the DiT accepts what the units produce ---------------------------------------------------


@pytest.mark.parametrize("config, kwargs", [
    (I2V, {"input_image": 1}),
    (FLF2V, {"input_image": 1, "end_image": 2}),
    (CONTROL, {"control_video": 3, "reference_image": 2}),
    (CAMERA, {"input_image": 1, "camera_control_direction": "LeftUp"}),
    (VACE, {"vace_video": 3, "vace_reference_image": 2}),
], ids=["i2v", "flf2v", "fun_control_reference", "camera", "vace"])
def test_dit_runs_on_the_conditioning(vae, clip, config, kwargs) -> None:
    kwargs = {k: (_video(v) if k.endswith("video") else _picture(v)) if isinstance(v, int) else v
              for k, v in kwargs.items()}
    pipe = _pipe(config, vae, clip)
    pipe.dit = random_dit(config)
    cond = _prepare(pipe, **kwargs)
    with torch.no_grad():
        out = pipe.dit(cond.latents, torch.tensor([500.0]), cond.positive["context"], **cond.shared)
    assert out.shape == cond.latents.shape and torch.isfinite(out).all()
