"""VAE training from scratch (``wan_train.vae_training``): it learns, and its checkpoint loads."""

from __future__ import annotations

import pytest
import torch

from wan_models import load_model
from wan_models.vae import CausalConv3d, VAEConfig, WanVAE
from wan_train.vae_training import (VAETrainConfig, first_frame_mismatch, identity_init, normalise_latents, save_vae,
                                    still_spread, to_video, train_vae, vae_loss)


def _clips() -> torch.Tensor:
    """Four 5-frame 16x16 clips: a bright square on a dark background at different places."""
    clips = torch.zeros(4, 3, 5, 16, 16, dtype=torch.uint8)
    for i in range(4):
        clips[i, i % 3, :, 4 * (i % 2):4 * (i % 2) + 8, 2 * i:2 * i + 8] = 255
    return clips


def test_loss_goes_down_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4))
    clips = _clips()
    before, _ = vae_loss(vae, to_video(clips), 0.05, 1e-4, torch.Generator().manual_seed(0))
    train_vae(vae, clips, VAETrainConfig(steps=30, batch_size=4, learning_rate=3e-3, log_every=10))
    with torch.no_grad():
        after, _ = vae_loss(vae, to_video(clips), 0.05, 1e-4, torch.Generator().manual_seed(0))
    assert after.item() < 0.7 * before.item()


def test_checkpoint_loads_with_load_model(tmp_path) -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4)).eval()
    path = save_vae(vae, tmp_path / "Wan2.1_VAE.pth")
    loaded = load_model(path, network="vae", dtype=torch.float32)
    video = to_video(_clips()[:1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video), vae.encode(video))


def test_normalise_latents_keeps_reconstructions_and_unit_scales_latents() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4)).eval()
    clips = _clips()
    with torch.no_grad():
        before = vae.decode(vae.encode(to_video(clips)), clamp=False)
        normalise_latents(vae, clips)
        z = vae.encode(to_video(clips))
        after = vae.decode(z, clamp=False)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4)), torch.ones(16), atol=1e-4, rtol=1e-4)


def test_first_frame_weight_scales_only_frame_zero() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4))
    video = to_video(_clips()[:2])
    losses = {}
    for weight in (1.0, 5.0):
        loss, metrics = vae_loss(vae, video, 0.0, 0.0, torch.Generator().manual_seed(0), first_frame_weight=weight)
        losses[weight] = metrics["l1"]
    with torch.no_grad():
        error = (vae.decode(vae.encode(video), clamp=False) - video).abs()
    per_frame = error.mean(dim=(0, 1, 3, 4))
    expected = (per_frame[0] * 5 + per_frame[1:].sum()) / per_frame.numel()
    assert abs(losses[5.0] - expected.item()) < 1e-4 * expected.item()
    assert abs(losses[1.0] - per_frame.mean().item()) < 1e-4 * per_frame.mean().item()


def test_crop_trains_on_squares_of_that_side_and_rejects_bad_sizes() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4))
    seen = []
    hook = vae.encoder.conv1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    train_vae(vae, _clips(), VAETrainConfig(steps=2, batch_size=2, crop=8, log_every=1))
    hook.remove()
    assert set(seen) == {(8, 8)}
    for bad in (12, 24):
        with pytest.raises(ValueError, match=f"crop {bad} must be a multiple of 8"):
            train_vae(vae, _clips(), VAETrainConfig(steps=1, crop=bad))


def _measured_after_training(term: str, metric: str, measure) -> dict[float, float]:
    """``measure(vae)`` after 30 steps on ``_clips()`` with the loss term ``term`` weighted 0 and 1
    (from the same start); the term's ``metric`` is logged exactly when its weight is not 0."""
    results = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        vae = WanVAE(VAEConfig(dim=4))
        config = VAETrainConfig(steps=30, batch_size=4, learning_rate=3e-3, log_every=10, **{term: weight})
        history = train_vae(vae, _clips(), config)
        with torch.no_grad():
            results[weight] = measure(vae)
        assert (metric in history[-1]) == bool(weight)
    return results


def test_still_spread_measures_and_training_removes_frame_zero_mismatch() -> None:
    """The spread is the variance of a still clip's latent frames around their mean, relative to each
    channel's variance; training with ``still_weight`` ends far below training without it (measured:
    0.03 against 0.50)."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4))
    clips = _clips()
    video = to_video(clips)
    with torch.no_grad():
        spread = still_spread(vae, video, torch.Generator().manual_seed(1))
        z = vae.encode(video[:, :, 2:3].expand(-1, -1, 5, -1, -1), normalize=True)
    expected = ((z - z.mean(dim=2, keepdim=True)).square() / z.var(dim=(0, 2, 3, 4), keepdim=True)).mean()
    assert spread.item() > 0.1
    torch.testing.assert_close(spread, expected)  # generator seed 1 picks frame 2

    spreads = _measured_after_training(
        "still_weight", "still_spread", lambda vae: still_spread(vae, video, torch.Generator().manual_seed(1)).item())
    assert spreads[1.0] < 0.2 * min(spreads[0.0], spread.item()), spreads


def test_first_frame_mismatch_compares_frame_zero_statistics_with_the_rest() -> None:
    """Zero when frame 0's per-channel mean and std equal the later frames'; for frame 0 at half the
    std around a mean one std off, 1 + 0.5^2 per channel. Training with ``first_frame_match``
    ends far below training without it."""
    rest = torch.randn(2, 16, 4, 3, 3)
    m = rest.mean(dim=(0, 2, 3, 4), keepdim=True)
    s = rest.std(dim=(0, 2, 3, 4), keepdim=True)
    first = torch.randn(2, 16, 1, 3, 3)
    first = (first - first.mean(dim=(0, 2, 3, 4), keepdim=True)) / first.std(dim=(0, 2, 3, 4), keepdim=True)
    same = torch.cat([m + s * first, rest], dim=2)
    assert first_frame_mismatch(same).item() < 1e-10
    off = torch.cat([m + s + 0.5 * s * first, rest], dim=2)
    assert first_frame_mismatch(off).item() == pytest.approx(1 + 0.5 ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 latent frames, got 1"):
        first_frame_mismatch(first)

    video = to_video(_clips())
    mismatches = _measured_after_training(
        "first_frame_match", "frame0_mismatch",
        lambda vae: first_frame_mismatch(vae.encode(video, normalize=True)).item())
    assert mismatches[1.0] < 0.5 * mismatches[0.0], mismatches  # measured: 0.58 against 1.61


def _random_fresh_vae(seed: int = 0) -> WanVAE:
    """A dim-4 VAE with random weights everywhere (random past taps too), then ``identity_init``."""
    torch.manual_seed(seed)
    vae = WanVAE(VAEConfig(dim=4))
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.2)
    return identity_init(vae).eval()


def test_a_fresh_vae_codes_a_video_frame_by_frame() -> None:
    """After ``identity_init`` (with ``frame_by_frame_init``) latent frame k is the picture code of
    input frame 4k (the chunk's last), and each decoded frame of a chunk is that latent's picture."""
    vae = _random_fresh_vae()
    video = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        pictures = [vae.encode(video[:, :, t:t + 1]) for t in (0, 4, 8)]
        decoded = vae.decode(z, clamp=False)
        decoded_pictures = [vae.decode(p, clamp=False) for p in pictures]
    assert z.shape[2] == 3
    for k, picture in enumerate(pictures):
        torch.testing.assert_close(z[:, :, k:k + 1], picture, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded[:, :, :1], decoded_pictures[0], rtol=1e-4, atol=1e-5)
    for k in (1, 2):
        for t in range(4 * k - 3, 4 * k + 1):
            torch.testing.assert_close(decoded[:, :, t:t + 1], decoded_pictures[k], rtol=1e-4, atol=1e-5)


def test_picture_training_uses_single_frames_and_keeps_the_frame_by_frame_start() -> None:
    """``pictures``: every batch is one frame per clip; the weights only video reaches (past taps,
    temporal resampling) get no gradient and stay as ``frame_by_frame_init`` set them."""
    vae = _random_fresh_vae()
    video_only = {name: p.detach().clone() for name, p in vae.named_parameters() if "time_conv" in name}
    seen = []
    hook = vae.encoder.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    train_vae(vae, _clips(), VAETrainConfig(steps=3, batch_size=2, pictures=True, learning_rate=1e-2, log_every=1))
    hook.remove()
    assert set(seen) == {1}
    params = dict(vae.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in video_only.items())
    assert all((m.weight[:, :, :-1] == 0).all() for m in vae.modules() if isinstance(m, CausalConv3d) and m.past_frames)
    assert (vae.encoder.conv1.weight[:, :, -1] != 0).any()
    with pytest.raises(ValueError, match="pictures have one latent frame"):
        train_vae(vae, _clips(), VAETrainConfig(steps=1, pictures=True, first_frame_match=1.0))
