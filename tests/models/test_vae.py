"""Behaviour of the Wan-VAE beyond the parity fixtures: shapes, streaming, tiling, loading, config
inference and input validation. Tiny widths (dim 4) keep the whole file to a few seconds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from wan_models.vae import StreamCache, VAEConfig, WanVAE, config_from_state_dict, normalize_channels


@pytest.fixture(autouse=True)
def _inference() -> Iterator[None]:
    with torch.no_grad():
        yield


@torch.no_grad()
def _random_vae(config: VAEConfig, seed: int = 0) -> WanVAE:
    """A VAE with the fixtures' random init: weights N(0, 1/fan_in), biases N(0, 0.1), gamma 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    model = WanVAE(config).eval()
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / p[0].numel() ** 0.5)
    return model


def _video(b: int, t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Smooth random video in [-1, 1] (upsampled noise, like natural frames rather than pixel noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, t, max(h // 8, 1), max(w // 8, 1), generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(t, h, w), mode="trilinear")


@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    return _random_vae(VAEConfig(dim=4))


# ---- shapes and streaming -----------------------------------------------------------------------


@pytest.mark.parametrize(("b", "t", "h", "w", "latent"), [
    (1, 1, 16, 16, (1, 2, 2)),
    (2, 5, 24, 40, (2, 3, 5)),      # odd latent sizes
    (1, 9, 40, 56, (3, 5, 7)),
    (1, 5, 36, 44, (2, 4, 5)),      # pixels not a multiple of 8: the encoder floors
])
def test_encode_decode_shapes(tiny: WanVAE, b: int, t: int, h: int, w: int, latent: tuple[int, int, int]) -> None:
    z = tiny.encode(_video(b, t, h, w))
    assert z.shape == (b, 16, *latent)
    video = tiny.decode(z)
    lt, lh, lw = latent
    assert video.shape == (b, 3, 1 + 4 * (lt - 1), 8 * lh, 8 * lw)
    assert video.abs().max() <= 1.0


def test_streaming_is_causal(tiny: WanVAE) -> None:
    """Later frames never change earlier outputs: encoding/decoding a prefix gives the prefix."""
    video = _video(1, 9, 24, 32)
    torch.testing.assert_close(tiny.encode(video[:, :, :5]), tiny.encode(video)[:, :, :2], rtol=0, atol=1e-6)
    z = torch.randn(1, 16, 3, 3, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(tiny.decode(z[:, :, :2]), tiny.decode(z)[:, :, :5], rtol=0, atol=1e-6)


def test_batch_matches_single_samples(tiny: WanVAE) -> None:
    """Batched = one at a time, up to float32 noise (conv kernels block differently per batch size)."""
    video = torch.cat([_video(1, 5, 24, 32, seed=3), _video(1, 5, 24, 32, seed=4)])
    z = tiny.encode(video)
    for i in range(2):
        torch.testing.assert_close(z[i:i + 1], tiny.encode(video[i:i + 1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tiny.decode(z)[i:i + 1], tiny.decode(z[i:i + 1]), rtol=1e-5, atol=2e-5)


def test_normalize_and_clamp_flags(tiny: WanVAE) -> None:
    video = _video(1, 5, 16, 24)
    raw, normed = tiny.encode(video, normalize=False), tiny.encode(video)
    mean = torch.tensor(tiny.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(tiny.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(normed, (raw - mean) / std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny.decode(raw, normalized=False), tiny.decode(normed), rtol=1e-5, atol=1e-5)
    unclamped = tiny.decode(normed * 8, clamp=False)  # scaled up so some pixels leave [-1, 1]
    assert unclamped.abs().max() > 1.0
    assert torch.equal(tiny.decode(normed * 8), unclamped.clamp(-1, 1))


def test_stream_cache_holds_two_frames_and_does_not_grow(tiny: WanVAE) -> None:
    cache = StreamCache()
    x = tiny.conv2(torch.randn(1, 16, 6, 2, 3))
    sizes = []
    for i in range(x.shape[2]):
        tiny.decoder(x[:, :, i:i + 1], cache)
        cache.first_chunk = False
        sizes.append(cache.nbytes)
        assert all(frames.shape[2] <= 2 for frames in cache._past.values())
    assert len(set(sizes[2:])) == 1, sizes


def test_gradients_flow_and_match_the_inference_path() -> None:
    """With autograd on, the allocating path runs (in-buffer ``out=`` kernels have no autograd):
    same values as under no_grad up to float32 noise, and backward reaches the first layer."""
    model = _random_vae(VAEConfig(dim=4), seed=9)
    video = _video(1, 5, 16, 24)
    expected = model.encode(video)
    with torch.enable_grad():
        z = model.encode(video)
        model.decode(z, tiled=True, tile_size=(1, 2), tile_stride=(1, 1)).square().mean().backward()
    torch.testing.assert_close(z.detach(), expected, rtol=1e-5, atol=1e-6)
    assert model.encoder.conv1.weight.grad.abs().sum() > 0


# ---- tiling ---------------------------------------------------------------------------------------


def test_one_tile_covering_everything_is_the_untiled_result(tiny: WanVAE) -> None:
    video = _video(1, 5, 24, 40)
    z = tiny.encode(video)
    assert torch.equal(tiny.encode(video, tiled=True, tile_size=(3, 5), tile_stride=(2, 2)), z)
    assert torch.equal(tiny.decode(z, tiled=True, tile_size=(8, 8), tile_stride=(4, 4)), tiny.decode(z))


def test_tile_blending_reproduces_a_local_network(tiny: WanVAE, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in network whose every output pixel depends only on its own input pixel, any
    tile gives the right values, so the linear blend (a weighted mean of equal values) must equal the
    untiled result up to rounding: tolerance 1e-6 on values of order 1. Misplaced tiles, wrong
    ramps or a missing normalisation by the summed masks would show as O(1) errors."""
    def local_decode(z: torch.Tensor, normalized: bool) -> torch.Tensor:
        frames = torch.cat([z[:, :3, :1], z[:, :3, 1:].repeat_interleave(4, dim=2)], dim=2)
        return frames.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)

    def local_encode(video: torch.Tensor, normalize: bool) -> torch.Tensor:
        return video[:, :1, ::4, ::8, ::8].repeat(1, 16, 1, 1, 1)

    monkeypatch.setattr(tiny, "_decode_clip", local_decode)
    monkeypatch.setattr(tiny, "_encode_clip", local_encode)
    z = torch.randn(2, 16, 3, 11, 14, generator=torch.Generator().manual_seed(5))
    video = torch.rand(2, 3, 9, 88, 112, generator=torch.Generator().manual_seed(6))
    for size, stride in [((4, 6), (2, 3)), ((5, 5), (3, 2)), ((3, 4), (3, 4)), ((6, 9), (1, 2))]:
        torch.testing.assert_close(tiny.decode(z, clamp=False, tiled=True, tile_size=size, tile_stride=stride),
                                   tiny.decode(z, clamp=False), rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny.encode(video, tiled=True, tile_size=size, tile_stride=stride),
                                   tiny.encode(video), rtol=0, atol=1e-6)


def test_tiled_is_close_to_untiled_on_a_real_network() -> None:
    """Real (random-weight) network, overlapping tiles: each tile sees only its own pixels (zero
    padding at its borders, and the per-frame attention in the middle block is global), so tiled and
    untiled differ genuinely, more than with trained weights. Tolerance: mean |diff| below half the
    mean |output|; seeds 0-3 give 0.13-0.18 (encode) and 0.21-0.37 (decode), while a misplaced,
    unweighted or unnormalised blend gives errors of the order of the output itself."""
    model = _random_vae(VAEConfig(dim=8))
    video = _video(1, 5, 48, 64)
    tiling = {"tile_size": (4, 6), "tile_stride": (2, 3)}
    z, z_tiled = model.encode(video), model.encode(video, tiled=True, **tiling)
    assert (z - z_tiled).abs().mean() < 0.5 * z.abs().mean()
    latents = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(7))
    x, x_tiled = model.decode(latents, clamp=False), model.decode(latents, clamp=False, tiled=True, **tiling)
    assert (x - x_tiled).abs().mean() < 0.5 * x.abs().mean()


# ---- loading and config inference -------------------------------------------------------------------


def test_meta_build_then_assign_load() -> None:
    source = _random_vae(VAEConfig(dim=4), seed=8)
    with torch.device("meta"):
        model = WanVAE(VAEConfig(dim=4))
    assert not list(model.buffers())  # nothing that load_state_dict would leave on meta
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    video = _video(1, 5, 16, 24)
    assert torch.equal(model.eval().encode(video), source.encode(video))


def test_release_layout_and_config_inference_at_real_size() -> None:
    with torch.device("meta"):
        state = WanVAE().state_dict()
    assert len(state) == 194 and sum(t.numel() for t in state.values()) == 126_892_531
    assert state["encoder.downsamples.5.time_conv.weight"].shape == (192, 192, 3, 1, 1)
    assert state["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert state["encoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert config_from_state_dict(state) == VAEConfig()


def test_config_inference_round_trips_unusual_layouts() -> None:
    config = VAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(0.5,),
                       temperal_downsample=(True, False))
    with torch.device("meta"):
        state = WanVAE(config).state_dict()
    assert config_from_state_dict(state) == config


def test_config_inference_rejects_foreign_state_dicts() -> None:
    with torch.device("meta"):
        state = WanVAE(VAEConfig(dim=4)).state_dict()
    with pytest.raises(ValueError, match="not a Wan-VAE state dict: no 'encoder.conv1.weight'"):
        config_from_state_dict({"patch_embedding.weight": torch.empty(1536, 16, 1, 2, 2)})
    with pytest.raises(ValueError, match="'model.' prefix"):
        config_from_state_dict({f"model.{k}": v for k, v in state.items()})
    with pytest.raises(ValueError, match="missing.*decoder.head.2.bias"):
        config_from_state_dict({k: v for k, v in state.items() if k != "decoder.head.2.bias"})
    with pytest.raises(ValueError, match="wrong shape.*decoder.middle.0.residual.2.weight"):
        config_from_state_dict({**state, "decoder.middle.0.residual.2.weight": torch.empty(16, 16, 1, 3, 3)})
    renamed = {k.replace("encoder.downsamples.0.residual", "encoder.downsamples.0.mlp"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="unrecognised layer encoder.downsamples.0"):
        config_from_state_dict(renamed)


# ---- input validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.encode(torch.zeros(3, 5, 16, 16)), r"video must be \[B, 3, T, H, W\], got shape \(3, 5, 16, 16\)"),
    (lambda m: m.encode(torch.zeros(1, 4, 5, 16, 16)), "3 channels .* got 4"),
    (lambda m: m.encode(torch.zeros(1, 3, 6, 16, 16)), "video has 6 frames; .* 1 \\+ 4k"),
    (lambda m: m.encode(torch.zeros(1, 3, 5, 4, 16)), "frames 4x16 are smaller than one latent pixel"),
    (lambda m: m.decode(torch.zeros(1, 4, 2, 2, 2)), "latents have 4 channels, this VAE has z_dim=16"),
    (lambda m: m.decode(torch.zeros(16, 2, 2, 2)), r"latents must be \[B, z_dim, T, h, w\]"),
    (lambda m: m.decode(torch.zeros(1, 16, 1, 4, 4), tiled=True, tile_size=(2, 2), tile_stride=(3, 1)),
     r"tile_stride \(3, 1\) exceeds tile_size \(2, 2\) in height"),
    (lambda m: m.encode(torch.zeros(1, 3, 1, 16, 16), tiled=True, tile_size=(2, 2, 2)),
     r"tile_size must be two positive integers .* got \(2, 2, 2\)"),
    (lambda m: m.decode(torch.zeros(1, 16, 1, 4, 4), tiled=True, tile_stride=(0, 2)), "tile_stride must be two positive"),
])
def test_bad_inputs_are_named(tiny: WanVAE, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(tiny)


def test_bad_configs_are_named() -> None:
    with pytest.raises(ValueError, match="temperal_downsample needs 3 flags"):
        VAEConfig(temperal_downsample=(True, True))
    with pytest.raises(ValueError, match="latents_mean has 16 values, z_dim is 4"):
        VAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="at most 2 temporal downsamples"):
        VAEConfig(temperal_downsample=(True, True, True))


@pytest.mark.parametrize("channels", [3, 8, 96])
def test_normalize_channels_is_f_normalize_with_its_gradients(channels: int) -> None:
    """The CPU sum-of-squares path against F.normalize: values, the out= form, and gradients, also
    where every channel is zero (where both give zero gradients, not NaN)."""
    x = torch.randn(2, channels, 3, 5, 7, generator=torch.Generator().manual_seed(channels))
    x[0, :, 1, 2, 3] = 0
    torch.testing.assert_close(normalize_channels(x), F.normalize(x, dim=1), rtol=1e-6, atol=1e-7)
    out = torch.empty_like(x)
    assert normalize_channels(x, out=out) is out
    torch.testing.assert_close(out, F.normalize(x, dim=1), rtol=1e-6, atol=1e-7)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    with torch.enable_grad():
        for function in (normalize_channels, lambda v: F.normalize(v, dim=1)):
            leaf = x.clone().requires_grad_(True)
            (function(leaf) * weight).sum().backward()
            grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
