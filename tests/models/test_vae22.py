"""Behaviour of the Wan2.2-VAE beyond the parity fixtures (``tests/test_parity_wan22.py``): shapes,
streaming, tiling, loading, detection and input validation. Tiny widths keep the file to seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wan_models import CheckpointError, load_model
from wan_models.vae import CausalConv3d, StreamCache, VAEConfig, WanVAE, _norm_silu_conv, _run_blocks
from wan_models.vae22 import LATENTS_MEAN, VAE22Config, WanVAE22, config_from_state_dict, unpatchify

TINY = VAE22Config(dim=4, dec_dim=5)


@pytest.fixture(autouse=True)
def _inference() -> Iterator[None]:
    with torch.no_grad():
        yield


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The fixtures' random init: weights N(0, 1/fan_in), biases N(0, 0.1), gamma 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def _video(b: int, t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Smooth random video in [-1, 1] (upsampled noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, t, max(h // 8, 1), max(w // 8, 1), generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(t, h, w), mode="trilinear")


def _latents(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> WanVAE22:
    return _randomize(WanVAE22(TINY))


# ---- shapes and streaming -----------------------------------------------------------------------


def test_encode_decode_shapes_and_factors(tiny: WanVAE22) -> None:
    assert (tiny.config.spatial_factor, tiny.config.temporal_factor, tiny.config.z_dim) == (16, 4, 48)
    z = tiny.encode(_video(2, 5, 32, 48))
    assert z.shape == (2, 48, 2, 2, 3)
    video = tiny.decode(z)
    assert video.shape == (2, 3, 5, 32, 48) and video.abs().max() <= 1.0
    assert tiny.decode(_latents(1, 48, 1, 1, 2)).shape == (1, 3, 1, 16, 32)


def test_streaming_is_causal(tiny: WanVAE22) -> None:
    """The reference streams (frame 0, then 4-frame chunks; one latent frame at a time), so later
    frames never change earlier outputs: a prefix encodes/decodes to the prefix of the result, up to
    float32 noise (the 1x1 convs before and after the stream run over all frames at once)."""
    video = _video(1, 9, 16, 32)
    torch.testing.assert_close(tiny.encode(video[:, :, :5]), tiny.encode(video)[:, :, :2], rtol=1e-5, atol=1e-5)
    z = _latents(1, 48, 3, 1, 2)
    torch.testing.assert_close(tiny.decode(z[:, :, :2]), tiny.decode(z)[:, :, :5], rtol=1e-5, atol=1e-5)


def _decode_chunk_at_once(model: WanVAE22, latents: torch.Tensor) -> torch.Tensor:
    """The released decode order: each latent frame's output frames go through every stage together."""
    dec, x, cache, chunks = model.decoder, model.conv2(latents), StreamCache(), []
    for i in range(x.shape[2]):
        h = _run_blocks((*dec.middle, *dec.upsamples), dec.conv1(x[:, :, i:i + 1], cache), cache)
        chunks.append(unpatchify(_norm_silu_conv(dec.head[0], dec.head[2], h, cache)))
        cache.first_chunk = False
    return torch.cat(chunks, dim=2)


@pytest.mark.parametrize("temporal", [(False, True, True), (True, False, True)])
def test_frame_at_a_time_decode_equals_the_chunk_at_once_order(temporal: tuple[bool, ...]) -> None:
    """The decoder runs the stages after each temporal upsample one frame at a time (less memory);
    with the causal cache that is the released computation, up to float32 rounding."""
    model = _randomize(WanVAE22(VAE22Config(dim=4, dec_dim=5, temperal_downsample=temporal)), seed=8)
    cuts = [i + 1 for i, flag in enumerate(temporal[::-1]) if flag]
    assert model.decoder.segments == [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, 4])]
    z = _latents(2, 48, 4, 2, 3, seed=9)
    expected = _decode_chunk_at_once(model, z)
    assert expected.shape == (2, 3, 13, 32, 48)
    torch.testing.assert_close(model.decode(z, normalized=False, clamp=False), expected, rtol=1e-5, atol=1e-5)


def test_wide_causal_convs_run_in_weight_slices_with_the_same_result() -> None:
    """oneDNN copies a conv's weight on every call; over 32 MiB (Wan2.2's 1024-wide convs: 108 MiB) the
    conv runs in slices of output channels, which must not change the result."""
    conv = CausalConv3d(312, 1050, 3).eval()  # 35.4 MB of weight: two slices of 525 channels
    assert conv.weight.nbytes > 2**25
    x = _latents(1, 312, 2, 3, 4, seed=10)
    expected = F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(conv(x, StreamCache()), expected, rtol=1e-5, atol=1e-5)


def test_batch_matches_single_samples(tiny: WanVAE22) -> None:
    video = torch.cat([_video(1, 5, 16, 32, seed=3), _video(1, 5, 16, 32, seed=4)])
    z = tiny.encode(video)
    for i in range(2):
        torch.testing.assert_close(z[i:i + 1], tiny.encode(video[i:i + 1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tiny.decode(z)[i:i + 1], tiny.decode(z[i:i + 1]), rtol=1e-5, atol=2e-5)


def test_normalize_and_clamp_flags(tiny: WanVAE22) -> None:
    video = _video(1, 5, 16, 32)
    raw, normed = tiny.encode(video, normalize=False), tiny.encode(video)
    mean = torch.tensor(tiny.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(tiny.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(normed, (raw - mean) / std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny.decode(raw, normalized=False), tiny.decode(normed), rtol=1e-5, atol=1e-5)
    unclamped = tiny.decode(normed * 8, clamp=False)
    assert unclamped.abs().max() > 1.0
    assert torch.equal(tiny.decode(normed * 8), unclamped.clamp(-1, 1))


# ---- tiling ---------------------------------------------------------------------------------------


def test_one_tile_covering_everything_is_the_untiled_result(tiny: WanVAE22) -> None:
    video = _video(1, 5, 32, 48)
    z = tiny.encode(video)
    assert torch.equal(tiny.encode(video, tiled=True, tile_size=(2, 3), tile_stride=(1, 1)), z)
    assert torch.equal(tiny.decode(z, tiled=True, tile_size=(4, 4), tile_stride=(2, 2)), tiny.decode(z))


def test_tile_blending_reproduces_a_local_network(tiny: WanVAE22, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in network whose every output pixel depends only on its own 16x16 input patch: any tile
    gives the right values, so the blend must equal the untiled result up to rounding (1e-6 on values
    of order 1). Tiles misplaced by the 16x factor, wrong ramps or a missing normalisation show as O(1)."""
    def local_decode(z: torch.Tensor, normalized: bool) -> torch.Tensor:
        frames = torch.cat([z[:, :3, :1], z[:, :3, 1:].repeat_interleave(4, dim=2)], dim=2)
        return frames.repeat_interleave(16, dim=3).repeat_interleave(16, dim=4)

    def local_encode(video: torch.Tensor, normalize: bool) -> torch.Tensor:
        return video[:, :1, ::4, ::16, ::16].repeat(1, 48, 1, 1, 1)

    monkeypatch.setattr(tiny, "_decode_clip", local_decode)
    monkeypatch.setattr(tiny, "_encode_clip", local_encode)
    z = _latents(1, 48, 2, 5, 7, seed=5)
    video = torch.rand(1, 3, 5, 80, 112, generator=torch.Generator().manual_seed(6))
    for size, stride in [((3, 4), (2, 2)), ((2, 5), (1, 3))]:
        torch.testing.assert_close(tiny.decode(z, clamp=False, tiled=True, tile_size=size, tile_stride=stride),
                                   tiny.decode(z, clamp=False), rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny.encode(video, tiled=True, tile_size=size, tile_stride=stride),
                                   tiny.encode(video), rtol=0, atol=1e-6)


def test_tiled_is_close_to_untiled_on_a_real_network() -> None:
    """Random-weight network, 2x2 overlapping tiles of 32x48 pixels on a 48x64 video: each tile sees
    only its own pixels (zero padding at its borders, frame-global attention in the middle blocks), so
    tiled and untiled genuinely differ, far more than with trained weights at real tile sizes.
    Bounds on mean |diff| / mean |output|: encode 0.7, decode 1.0; seeds 0-3 gave 0.38-0.54 and
    0.62-0.84. The exact check of the blend is the local-network test above."""
    model = _randomize(WanVAE22(VAE22Config(dim=4, dec_dim=8)), seed=3)
    tiling = {"tile_size": (2, 3), "tile_stride": (1, 2)}
    video = _video(1, 5, 48, 64, seed=5)
    z, z_tiled = model.encode(video), model.encode(video, tiled=True, **tiling)
    assert z_tiled.shape == z.shape and (z - z_tiled).abs().mean() < 0.7 * z.abs().mean()
    latents = _latents(1, 48, 2, 3, 4, seed=7)
    x, x_tiled = model.decode(latents, clamp=False), model.decode(latents, clamp=False, tiled=True, **tiling)
    assert x_tiled.shape == x.shape and (x - x_tiled).abs().mean() < 1.0 * x.abs().mean()


# ---- loading, detection and config inference ----------------------------------------------------------


def test_release_layout_and_config_inference_at_real_size() -> None:
    """196 tensors and 704,688,668 parameters, as diffusers' ``AutoencoderKLWan`` builds the Wan 2.2
    VAE (base_dim 160, decoder_base_dim 256, z_dim 48, is_residual, patch_size 2)."""
    with torch.device("meta"):
        state = WanVAE22().state_dict()
    assert len(state) == 196 and sum(t.numel() for t in state.values()) == 704_688_668
    assert state["encoder.conv1.weight"].shape == (160, 12, 3, 3, 3)
    assert state["decoder.head.2.weight"].shape == (12, 256, 3, 3, 3)
    assert state["decoder.upsamples.0.upsamples.3.resample.1.weight"].shape == (1024, 1024, 3, 3)
    assert config_from_state_dict(state) == VAE22Config() and len(LATENTS_MEAN) == 48


def test_config_inference_round_trips_and_rejects_broken_state_dicts() -> None:
    config = VAE22Config(dim=4, dec_dim=6, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, False))
    with torch.device("meta"):
        state = WanVAE22(config).state_dict()
    assert config_from_state_dict(state) == config
    with pytest.raises(ValueError, match="missing.*decoder.head.2.bias"):
        config_from_state_dict({k: v for k, v in state.items() if k != "decoder.head.2.bias"})
    with pytest.raises(ValueError, match="not a Wan2.2-VAE state dict: no 'conv2.weight'"):
        config_from_state_dict({k: v for k, v in state.items() if k != "conv2.weight"})


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_load_model_detects_the_wan22_vae_from_a_pth(tiny: WanVAE22, tmp_path: Path) -> None:
    path = _save(tiny, tmp_path / "Wan2.2_VAE.pth")
    model = load_model(path)
    assert type(model) is WanVAE22 and model.config == tiny.config
    video = _video(1, 5, 16, 32)
    torch.testing.assert_close(model.encode(video), tiny.encode(video), rtol=0, atol=0)
    assert type(load_model(path, network="vae22")) is WanVAE22


def test_wan21_and_wan22_vae_files_are_not_interchangeable(tiny: WanVAE22, tmp_path: Path) -> None:
    path22 = _save(tiny, tmp_path / "Wan2.2_VAE.pth")
    path21 = _save(_randomize(WanVAE(VAEConfig(dim=4))), tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match=r"Wan2\.2_VAE\.pth holds the Wan 2\.2 VAE \(48 latent channels, Wan2\.2_VAE\.pth\), not the Wan 2\.1 VAE"):
        load_model(path22, network="vae")
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth holds the Wan 2\.1 VAE \(16 latent channels, Wan2\.1_VAE\.pth\), not the Wan 2\.2 VAE"):
        load_model(path21, network="vae22")
    assert type(load_model(path21)) is WanVAE


# ---- input validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "message"), [
    ((1, 3, 5, 24, 32), "frames 24x32: the Wan2.2 VAE needs height and width that are multiples of 16"),
    ((1, 3, 5, 32, 40), "frames 32x40: .* multiples of 16"),
    ((1, 3, 6, 32, 32), "video has 6 frames; .* 1 \\+ 4k"),
    ((1, 4, 5, 32, 32), "3 channels .* got 4"),
    ((3, 5, 32, 32), r"video must be \[B, 3, T, H, W\]"),
])
def test_bad_videos_are_named_before_any_work(tiny: WanVAE22, monkeypatch: pytest.MonkeyPatch,
                                             shape: tuple[int, ...], message: str) -> None:
    monkeypatch.setattr(tiny, "_encode_clip", lambda *a: pytest.fail("encoded an invalid video"))
    with pytest.raises(ValueError, match=message):
        tiny.encode(torch.randn(*shape))


def test_bad_latents_and_configs_are_named(tiny: WanVAE22) -> None:
    with pytest.raises(ValueError, match="latents have 16 channels, this VAE has z_dim=48"):
        tiny.decode(_latents(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="latents_mean has 48 values, z_dim is 16"):
        VAE22Config(z_dim=16)
    with pytest.raises(ValueError, match="dec_dim must be positive"):
        VAE22Config(dec_dim=0)
