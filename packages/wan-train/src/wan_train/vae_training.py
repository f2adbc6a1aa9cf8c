"""Train a (small) Wan-VAE from scratch for reconstruction: ``python -m wan_train.vae``.

The DiT trainer only fine-tunes DiTs; a new tiny model (see ``docs/tiny_model.md``) also needs a VAE
that matches its data. This trains :class:`wan_models.WanVAE` of any :class:`VAEConfig` on the
videos of a ``metadata.csv`` folder with an L1 + MSE reconstruction loss.

Latents are learned *in the normalised space* the pipeline uses: the encoder's output goes through
the released per-channel ``(mu - mean) / std`` (which every loader applies, as it is not stored in
the file), a small Gaussian noise is added (the VAE's sampling, with a posterior std fixed relative
to the latents' spread, so the encoder cannot drown its signal by shrinking) and a small
``kl_weight * z**2`` penalty keeps them bounded. After training, :func:`normalise_latents` folds a
per-channel affine map into the encoder's and decoder's 1x1 convs so that the normalised latents of
the data are zero-mean and unit-std: a DiT trained on them sees N(0, 1)-scaled inputs although the
tiny encoder's raw scale differs from the released VAE's. The checkpoint is ``Wan2.1_VAE.pth`` (released key layout, float32) and loads with
``wan_models.load_model``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from wan_models import read_state_dict
from wan_models.vae import AttentionBlock, CausalConv3d, Resample, ResidualBlock, VAEConfig, WanVAE

from .foreground import foreground_mask, weighted
from .outputs import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["VAETrainConfig", "first_frame_mismatch", "foreground_weight", "frame_by_frame_init", "identity_init",
           "load_clips", "main", "normalise_latents", "save_vae", "still_spread", "to_video", "train_vae", "vae_loss"]


@dataclass
class VAETrainConfig:
    """Hyper-parameters of :func:`train_vae`."""

    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-3
    latent_noise: float = 0.05  # noise added to the latents, relative to their std (fixed-variance posterior)
    kl_weight: float = 1e-4     # weight of mean(z**2) on the normalised latents
    fg_weight: float = 1.0      # loss weight of pixels far from the clip's median colour
    first_frame_weight: float = 1.0  # loss weight of frame 0 (the causal VAE's one-frame first chunk)
    crop: int | None = None     # train on random square crops of this side (convolutions are size-agnostic)
    still_weight: float = 0.0   # weight of the latent frames' spread on still clips (see still_spread)
    first_frame_match: float = 0.0  # weight of frame 0's latent statistics mismatch (see first_frame_mismatch)
    pictures: bool = False      # train on one random frame of each clip: the picture codec (see frame_by_frame_init)
    seed: int = 0
    log_every: int = 50


def load_clips(base: Path, metadata: Path, num_frames: int, height: int, width: int,
               limit: int | None = None) -> torch.Tensor:
    """The first ``num_frames`` frames of every video listed in ``metadata`` (``video`` column) as a
    uint8 tensor ``[N, 3, T, H, W]``, kept in memory (small clips: decoding once is the cheap way)."""
    from wan_runtime.video_io import load_video

    with open(metadata, newline="") as f:
        names = [row["video"] for row in csv.DictReader(f)]
    names = names[:limit] if limit else names
    clips = [np.stack([np.asarray(frame) for frame in load_video(base / name, num_frames, height, width)])
             for name in names]
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()


def to_video(clips: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, T, H, W]`` -> float in [-1, 1], the VAE's input range."""
    return clips.float() / 127.5 - 1.0


def foreground_weight(video: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``[B, 1, T, H, W]``: 1, or ``fg_weight`` on the clip's foreground
    (:func:`~wan_train.foreground.foreground_mask`): small objects then count as much as the background."""
    return weighted(foreground_mask(video), fg_weight).to(video.dtype)


def still_spread(vae: WanVAE, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """How much the latent frames of a still clip differ, relative to each latent channel's variance
    (the scale the pipeline's DiT sees them at, after :func:`normalise_latents`).

    One random frame of ``video`` is repeated over its length and encoded. The causal VAE codes
    frame 0 alone, and unless told otherwise gives it a latent unlike the later frames of the same
    still picture; a DiT, which has only relative (RoPE) positions, then cannot tell what frame 0
    should look like. Penalising the spread makes frame 0 speak the later frames' language.
    """
    index = int(torch.randint(video.shape[2], (1,), generator=generator))
    still = video[:, :, index:index + 1].expand(-1, -1, video.shape[2], -1, -1)
    z = vae.encode(still, normalize=True)
    variance = z.detach().var(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-8)
    return ((z - z.mean(dim=2, keepdim=True)).square() / variance).mean()


def first_frame_mismatch(z: torch.Tensor) -> torch.Tensor:
    """How far the statistics of latent frame 0 are from those of the later frames, per channel:
    ``((m0 - m) ** 2 + (s0 - s) ** 2) / s ** 2`` averaged over channels (``m``, ``s``: mean and std
    over the batch and the grid; the later frames' are the target and get no gradient; bounded
    gradients even where frame 0's spread is near zero, as it is at the start of training).

    The causal VAE codes frame 0 alone; left to itself it gives it latents of about a third of the
    later frames' spread around another mean. A DiT's loss then hardly sees frame 0, and the decoder
    amplifies the DiT's errors there three-fold: generated first frames come out as flat washes.
    """
    if z.shape[2] < 2:
        raise ValueError(f"first_frame_mismatch needs at least 2 latent frames, got {z.shape[2]}")
    first, rest = z[:, :, 0], z[:, :, 1:].detach()
    m0, s0 = first.mean(dim=(0, 2, 3)), first.std(dim=(0, 2, 3))
    m, s = rest.mean(dim=(0, 2, 3, 4)), rest.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)
    return (((m0 - m).square() + (s0 - s).square()) / s.square()).mean()


def vae_loss(vae: WanVAE, video: torch.Tensor, latent_noise: float, kl_weight: float,
             generator: torch.Generator | None = None, fg_weight: float = 1.0,
             first_frame_weight: float = 1.0, still_weight: float = 0.0,
             first_frame_match: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted reconstruction (L1 + MSE, see :func:`foreground_weight`; frame 0 scaled by
    ``first_frame_weight``) of ``video`` through noisy normalised latents, plus the latent penalty,
    ``still_weight`` times :func:`still_spread` and ``first_frame_match`` times :func:`first_frame_mismatch`."""
    z = vae.encode(video, normalize=True)
    scale = latent_noise * z.detach().std()  # relative: a fixed signal-to-noise ratio at any latent scale
    noisy = z + scale * torch.randn(z.shape, generator=generator, dtype=z.dtype)
    recon = vae.decode(noisy, normalized=True, clamp=False)
    weight = foreground_weight(video, fg_weight)
    if first_frame_weight != 1.0:
        weight[:, :, :1] *= first_frame_weight
    l1 = (weight * (recon - video).abs()).mean()
    mse = (weight * (recon - video).square()).mean()
    prior = z.pow(2).mean()
    loss = l1 + mse + kl_weight * prior
    metrics = {"l1": l1.item(), "mse": mse.item(), "z_rms": prior.sqrt().item()}
    if still_weight:
        spread = still_spread(vae, video, generator)
        loss = loss + still_weight * spread
        metrics["still_spread"] = spread.item()
    if first_frame_match:
        mismatch = first_frame_mismatch(z)
        loss = loss + first_frame_match * mismatch
        metrics["frame0_mismatch"] = mismatch.item()
    return loss, {"loss": loss.item(), **metrics}


def train_vae(vae: WanVAE, clips: torch.Tensor, config: VAETrainConfig,
              output: Path | None = None, save_every: int = 0) -> list[dict[str, float]]:
    """Train ``vae`` in place on uint8 ``clips`` with AdamW (cosine LR); returns the logged metrics.

    With ``output``, the weights are written there (``Wan2.1_VAE.pth``) every ``save_every`` steps
    and at the end.
    """
    factor = vae.config.spatial_factor
    if config.crop is not None and (config.crop % factor or not factor <= config.crop <= min(clips.shape[-2:])):
        raise ValueError(f"crop {config.crop} must be a multiple of {factor} between {factor} and the clips' "
                         f"{tuple(clips.shape[-2:])} frame size")
    if config.pictures and (config.first_frame_match or config.still_weight):
        raise ValueError("pictures have one latent frame: first_frame_match and still_weight need whole clips")
    gen = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    history: list[dict[str, float]] = []
    vae.train()
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = clips[torch.randint(len(clips), (config.batch_size,), generator=gen)]
        if config.pictures:
            frames = torch.randint(batch.shape[2], (len(batch),), generator=gen)
            batch = batch[torch.arange(len(batch)), :, frames].unsqueeze(2)
        if config.crop:
            top, left = torch.randint(0, min(batch.shape[-2:]) - config.crop + 1, (2,), generator=gen).tolist()
            batch = batch[..., top:top + config.crop, left:left + config.crop]
        loss, metrics = vae_loss(vae, to_video(batch), config.latent_noise, config.kl_weight, gen,
                                 config.fg_weight, config.first_frame_weight, config.still_weight,
                                 config.first_frame_match)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % config.log_every == 0 or step == config.steps:
            metrics["step"] = step
            history.append(metrics)
            logger.info("step %d/%d %s (%.0f s)", step, config.steps,
                        " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"),
                        time.perf_counter() - start)
        if output is not None and save_every and step % save_every == 0:
            save_vae(vae, output)
    if output is not None:
        save_vae(vae, output)
    vae.eval()
    return history


@torch.no_grad()
def normalise_latents(vae: WanVAE, clips: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale ``vae`` in place so that its normalised latents of ``clips`` are zero-mean, unit-std per channel.

    The pipeline always applies the released statistics, whatever the VAE; a tiny VAE's latents come
    out at another scale (a DiT learns worse on latents far from unit scale). With ``m``, ``s`` the
    per-channel mean/std of the current normalised latents, the encoder's mu rows become
    ``mean + (mu - mean - std * m) / s`` and the decoder's first 1x1 conv takes the inverse, so that
    decode(encode(x)) is unchanged. Returns the ``(m, s)`` that were folded in.
    """
    z = torch.cat([vae.encode(to_video(clips[i:i + batch_size])) for i in range(0, len(clips), batch_size)])
    m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
    mean = torch.tensor(vae.config.latents_mean)
    std = torch.tensor(vae.config.latents_std)
    zd = vae.config.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias
    w1[:zd] /= s.view(-1, 1, 1, 1, 1)
    b1[:zd] = (b1[:zd] - mean - std * m) / s + mean
    w2, b2 = vae.conv2.weight, vae.conv2.bias
    matrix = w2[:, :, 0, 0, 0].clone()
    b2 += matrix @ (mean + std * m - s * mean)
    w2 *= s.view(1, -1, 1, 1, 1)
    return m, s


@torch.no_grad()
def identity_init(vae: WanVAE) -> WanVAE:
    """Zero the last conv of every residual block and every attention output, so that each block
    starts as the identity: a fresh deep VAE then trains like a shallow one instead of sitting on
    the mean colour for hundreds of steps (as PyTorch's default initialisation does). Then
    :func:`frame_by_frame_init`."""
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            torch.nn.init.zeros_(module.residual[-1].weight)
            torch.nn.init.zeros_(module.residual[-1].bias)
        elif isinstance(module, AttentionBlock):
            torch.nn.init.zeros_(module.proj.weight)
            torch.nn.init.zeros_(module.proj.bias)
    return frame_by_frame_init(vae)


@torch.no_grad()
def frame_by_frame_init(vae: WanVAE) -> WanVAE:
    """Make the VAE code a video as a series of single pictures: every causal conv looks at the
    current frame only (its taps on past frames zeroed), the encoder's temporal downsampling keeps
    the last frame of each chunk and the decoder's temporal upsampling repeats each frame.

    The first chunk (one frame, a picture) never reaches those weights, so training on pictures
    leaves them as they are; a VAE trained on pictures alone then starts video training as a
    working picture codec for every frame (right but for motion) instead of mixing random taps
    into frames 1..T, which wrecked the picture code as well. Later frames' latents start out with
    frame 0's statistics too."""
    for module in vae.modules():
        if isinstance(module, CausalConv3d) and module.past_frames:
            module.weight[:, :, :-1] = 0
    for module in vae.modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv
            channels = conv.in_channels
            conv.weight.zero_()
            conv.bias.zero_()
            identity = torch.eye(channels, dtype=conv.weight.dtype)
            for half in range(conv.out_channels // channels):  # upsample3d: both frames of each pair
                conv.weight[half * channels:(half + 1) * channels, :, -1, 0, 0] = identity
    return vae


def save_vae(vae: WanVAE, path: Path) -> Path:
    """The weights as a released-layout ``.pth`` (float32), written atomically."""
    weights = {k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}
    return atomic_write(path, lambda tmp: torch.save(weights, tmp))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train a VAE of ``--dim`` on a dataset folder, write ``--output``."""
    parser = argparse.ArgumentParser(prog="python -m wan_train.vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_base_path", type=Path, required=True)
    parser.add_argument("--dataset_metadata_path", type=Path, required=True)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num_frames", type=int, default=17)
    parser.add_argument("--max_clips", type=int, default=None, help="use only the first N clips")
    parser.add_argument("--dim", type=int, default=8, help="VAEConfig.dim (z_dim stays 16)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--latent_noise", type=float, default=0.05)
    parser.add_argument("--kl_weight", type=float, default=1e-4)
    parser.add_argument("--fg_weight", type=float, default=1.0,
                        help="loss weight of object pixels (far from the clip's median colour)")
    parser.add_argument("--first_frame_weight", type=float, default=1.0,
                        help="loss weight of frame 0, which the causal VAE codes alone")
    parser.add_argument("--crop", type=int, default=None, help="train on random square crops of this side")
    parser.add_argument("--still_weight", type=float, default=0.0,
                        help="weight of the spread of a still clip's latent frames (frame 0 coded like the rest)")
    parser.add_argument("--first_frame_match", type=float, default=0.0,
                        help="weight of the mismatch of frame 0's latent mean/std with the later frames'")
    parser.add_argument("--pictures", action="store_true",
                        help="train on one random frame of each clip (the first, one-frame chunk of the causal VAE: "
                             "a picture codec, which a fresh VAE's frame-by-frame start carries over to video)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_steps", type=int, default=200)
    parser.add_argument("--resume", type=Path, default=None, help="start from these VAE weights")
    parser.add_argument("--output", type=Path, required=True, help="the .pth to write (Wan2.1_VAE.pth)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    vae = identity_init(WanVAE(VAEConfig(dim=args.dim)))
    if args.resume is not None:
        vae.load_state_dict(read_state_dict(args.resume))  # refuses code and damaged files with one clear line
    start = time.perf_counter()
    clips = load_clips(args.dataset_base_path, args.dataset_metadata_path, args.num_frames, args.height,
                       args.width, args.max_clips)
    logger.info("%d clips loaded in %.0f s; VAE dim %d: %.2f M parameters", len(clips),
                time.perf_counter() - start, args.dim, sum(p.numel() for p in vae.parameters()) / 1e6)
    config = VAETrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                            latent_noise=args.latent_noise, kl_weight=args.kl_weight, fg_weight=args.fg_weight,
                            first_frame_weight=args.first_frame_weight, crop=args.crop,
                            still_weight=args.still_weight, first_frame_match=args.first_frame_match,
                            pictures=args.pictures, seed=args.seed)
    train_vae(vae, clips, config, args.output, args.save_steps)
    m, s = normalise_latents(vae, clips[:256])
    logger.info("normalised latents: folded per-channel mean %s and std %s into conv1/conv2",
                [round(v, 2) for v in m.tolist()], [round(v, 2) for v in s.tolist()])
    save_vae(vae, args.output)


if __name__ == "__main__":
    main()
