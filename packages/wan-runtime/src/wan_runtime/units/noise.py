"""Initial latents: seeded Gaussian noise (bit-identical to DiffSynth), or a noised input video."""

from __future__ import annotations

import logging

import torch

from wan_models.configs import VAE22_FILE, VAE_FILE

from . import Conditioning
from .image import video_pixels
from .vace import reference_pixels

logger = logging.getLogger(__name__)


def _check_vae_fits_dit(pipe) -> None:
    """The VAE's latent channels must be the DiT's output channels (TI2V-5B: the Wan 2.2 VAE, 48; every
    other Wan DiT: the Wan 2.1 VAE, 16); checked before any network runs."""
    if pipe.vae is None:  # latents only: the DiT decides the channels
        return
    z_dim, config = pipe.vae.config.z_dim, pipe.dit.config
    if z_dim != config.out_dim:
        need = VAE22_FILE if config.fuses_image_latents else VAE_FILE
        raise ValueError(f"the loaded VAE ({type(pipe.vae).__name__}, {z_dim} latent channels) does not fit the "
                         f"loaded {config.variant} DiT ({config.out_dim} latent channels): load {need} with it")


def initial_noise(pipe, request, cond: Conditioning) -> None:
    """Noise ``[1, z, F_lat(+1), H/s, W/s]`` (``s``: the VAE's spatial factor) from
    ``torch.Generator(rand_device).manual_seed(seed)``.

    With a VACE reference image the noise gets one extra latent frame, moved from the end to the
    front (where the reference's latent frame sits).
    """
    _check_vae_fits_dit(pipe)
    frames = request.latent_frames + (1 if request.vace_reference_image is not None else 0)
    factor = pipe.vae_spatial_factor
    shape = (1, pipe.latent_channels, frames, request.height // factor, request.width // factor)
    generator = None if request.seed is None else torch.Generator(request.rand_device).manual_seed(request.seed)
    noise = torch.randn(shape, generator=generator, device=request.rand_device, dtype=torch.float32)
    noise = noise.to(device=pipe.device, dtype=pipe.torch_dtype)
    if request.vace_reference_image is not None:
        noise = torch.cat([noise[:, :, -1:], noise[:, :, :-1]], dim=2)
    cond.noise = cond.latents = noise


def input_video(pipe, request, cond: Conditioning) -> None:
    """Video-to-video: encode ``input_video`` and noise it to the schedule's first timestep."""
    if request.input_video is None:
        return
    pixels = video_pixels(pipe, request, request.input_video, "input_video")
    if request.denoising_strength == 1.0:  # the schedule starts at sigma 1: nothing of the video is kept
        logger.warning("input_video with denoising_strength=1.0 starts from pure noise: the video only sets the "
                       "size; lower denoising_strength (--denoising-strength), e.g. 0.7, to keep its content")
        return
    latents = pipe.encode_video(pixels, request)
    if request.vace_reference_image is not None:
        reference = pipe.encode_video(reference_pixels(pipe, request), request, tiled=False)
        latents = torch.cat([reference, latents], dim=2)
    cond.latents = pipe.scheduler.add_noise(latents, cond.noise, pipe.scheduler.timesteps[0])
