"""Wan 2.2 DiT behaviour beyond the fixtures: per-token timesteps and the I2V expert without CLIP."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import wan_models
from wan_models import DiTConfig, WanDiT

from factories import TINY_DIT, dit_inputs, meta_dit, random_dit, random_weights

TI2V = TINY_DIT.replace(in_dim=48, out_dim=48, family="wan2.2")
I2V_EXPERT = TINY_DIT.replace(in_dim=36, family="wan2.2")
GRID = (3, 4, 6)


def _tokens(x: torch.Tensor, patch: tuple[int, int, int]) -> int:
    return math.prod(n // p for n, p in zip(x.shape[2:], patch))


def _per_token_inputs(seed: int) -> tuple[WanDiT, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random TI2V DiT, ``x``, timesteps ``[B]`` and context (fresh random values per seed)."""
    x, t, context = dit_inputs(TI2V, batch=2, seed=seed, grid=GRID)
    return random_dit(TI2V, seed=seed), x, t, context


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equal_per_token_timesteps_give_the_plain_path(seed: int) -> None:
    # Same arithmetic per element; the time MLP runs on B*L rows instead of B, so allow float32 rounding.
    model, x, t, context = _per_token_inputs(seed)
    tokens = t[:, None].expand(-1, _tokens(x, TI2V.patch_size))
    with torch.no_grad():
        plain, per_token = model(x, t, context), model(x, tokens, context)
    torch.testing.assert_close(per_token, plain, rtol=1e-5, atol=1e-5)


def test_per_token_timesteps_change_only_what_they_should() -> None:
    model, x, t, context = _per_token_inputs(4)
    tokens = t[:, None].repeat(1, _tokens(x, TI2V.patch_size))
    tokens[0, : GRID[1] * GRID[2] // 4] = 0  # image-to-video row: frame-0 tokens at t = 0
    with torch.no_grad():
        out = model(x, tokens, context)
        row1 = model(x[1:], t[1:], context[1:])
        row0_plain = model(x[:1], t[:1], context[:1])
    torch.testing.assert_close(out[1:], row1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:1], row0_plain, atol=1e-3)


def test_block_stages_with_per_token_timesteps_equal_forward() -> None:
    model, x, t, context = _per_token_inputs(5)
    tokens = t[:, None].repeat(1, _tokens(x, TI2V.patch_size))
    tokens[:, :6] = 0
    with torch.no_grad():
        whole = model(x, tokens, context)
        prepared = model.prepare(x, tokens, context)
        staged = model.finish(model.run_blocks(prepared), prepared)
    assert prepared.e.shape == (2, tokens.shape[1], TI2V.dim)
    assert prepared.e0.shape == (2, tokens.shape[1], 6, TI2V.dim)
    assert torch.equal(staged, whole)


@pytest.mark.parametrize("shape", ["long", "batch", "3d"])
def test_wrong_timestep_shape_is_a_clear_error_before_the_blocks(shape: str) -> None:
    model, x, t, context = _per_token_inputs(6)
    length = _tokens(x, TI2V.patch_size)
    bad = {"long": torch.zeros(2, length + 1), "batch": torch.zeros(3, length), "3d": torch.zeros(2, length, 2)}
    ran = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: ran.append(1))
    with pytest.raises(ValueError, match=rf"\[2, {length}\]"):
        model(x, bad[shape], context)
    assert not ran


def test_motion_embedding_with_per_token_timesteps() -> None:
    model, x, t, context = _per_token_inputs(7)
    motion = torch.randn(2, 6 * TI2V.dim) * 0.1
    tokens = t[:, None].expand(-1, _tokens(x, TI2V.patch_size))
    with torch.no_grad():
        e, e0 = model.embed_time(t, motion)
        e_tok, e0_tok = model.embed_time(tokens, motion)
    torch.testing.assert_close(e0_tok, e0[:, None].expand_as(e0_tok), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e_tok, e[:, None].expand_as(e_tok), rtol=1e-5, atol=1e-6)


def test_i2v_expert_without_clip_loads_strictly(tmp_path) -> None:
    sd = random_weights(meta_dit(I2V_EXPERT))
    assert not any("img" in key for key in sd)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    model = wan_models.load_model(tmp_path / "diffusion_pytorch_model.safetensors")
    assert model.config.family == "wan2.2" and not model.config.image_input
    assert model.config.variant == "wan2.2-i2v"
    assert not hasattr(model, "img_emb") and not hasattr(model.blocks[0].cross_attn, "k_img")
    assert model.state_dict().keys() == sd.keys()
    x, t, context = dit_inputs(TINY_DIT, grid=GRID)
    y = torch.randn(1, 20, *GRID)
    with torch.no_grad():
        assert model(x, t, context, y=y).shape == x.shape
    with pytest.raises(ValueError, match="no image input"):
        model(x, t, context, y=y, clip_feature=torch.zeros(1, 257, 1280))


def test_ti2v_detected_from_shapes(tmp_path) -> None:
    save_file(random_weights(meta_dit(TI2V)), tmp_path / "model.safetensors")
    model = wan_models.load_model(tmp_path / "model.safetensors")
    assert model.config == TI2V.replace(num_heads=1, text_len=512) and model.config.variant == "wan2.2-ti2v"


def test_wan21_configs_keep_their_clip_branch() -> None:
    official = dict(model_type="i2v", in_dim=36, dim=32, ffn_dim=48, num_heads=2, num_layers=1)
    wan21 = DiTConfig.from_official(official)
    assert wan21.image_input and wan21.family == "wan2.1" and wan21.variant == "i2v"
    expert = DiTConfig.from_official(official, family="wan2.2")
    assert not expert.image_input and expert.variant == "wan2.2-i2v"
    ti2v = DiTConfig.from_official({**official, "model_type": "ti2v", "in_dim": 48, "out_dim": 48})
    assert ti2v.family == "wan2.2" and not ti2v.image_input
    with pytest.raises(ValueError, match="no CLIP"):
        DiTConfig(image_input=True, family="wan2.2")
    with pytest.raises(ValueError, match="model_type"):
        DiTConfig.from_official({**official, "model_type": "flf2v"}, family="wan2.2")
