"""VACE: ``vace_context [1, 96, F_lat(+1), h, w]`` from a video to edit, its mask and a reference image.

Channels: VAE(video outside the mask) (z), VAE(video inside the mask) (z), and the mask's first
channel with each ``8x8`` pixel block spread over 64 channels, resampled in time to the latent
frames. A reference image adds a leading latent frame (its latents, zeros elsewhere) that the
noise unit mirrors and the pipeline drops before decoding.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..images import image_to_tensor
from . import Conditioning
from .image import video_pixels

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline
    from ..request import GenerationRequest

logger = logging.getLogger(__name__)


def mask_latents(mask: torch.Tensor, latent_frames: int, factor: int) -> torch.Tensor:
    """``mask [T, H, W]`` -> ``[1, factor², latent_frames, H/factor, W/factor]``.

    Channel ``factor * p + q`` of latent cell ``(y, x)`` is pixel ``(factor * y + p, factor * x + q)``;
    frames are picked nearest-exact (latent frame ``f`` <- video frame ``floor((f + 0.5) T / F_lat)``).
    """
    frames, height, width = mask.shape
    h, w = height // factor, width // factor
    blocks = mask.reshape(frames, h, factor, w, factor).permute(2, 4, 0, 1, 3)
    blocks = blocks.reshape(1, factor * factor, frames, h, w)
    return F.interpolate(blocks, size=(latent_frames, h, w), mode="nearest-exact")


def reference_pixels(pipe: WanVideoPipeline, request: GenerationRequest) -> torch.Tensor:
    """``vace_reference_image`` as a one-frame video ``[1, 3, 1, H, W]`` on the device.

    Not resampled (as in the reference): it must already have the video's size.
    """
    reference = request.vace_reference_image
    pixels = image_to_tensor(reference, name="vace_reference_image")
    if pixels.shape[1:] != (request.height, request.width):
        raise ValueError(f"vace_reference_image is {reference.size}, expected (width, height) = "
                         f"({request.width}, {request.height}); resize or pad it first")
    return pixels[None, :, None].to(pipe.device)


def vace(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> None:
    """``vace_context`` and ``vace_scale`` when any of ``vace_video``, ``vace_video_mask``,
    ``vace_reference_image`` is given; a missing video is zeros, a missing mask is all ones."""
    reference = request.vace_reference_image
    if request.vace_video is None and request.vace_video_mask is None and reference is None:
        if request.vace_scale != 1.0:
            logger.warning("vace_scale=%s has no effect without vace_video, vace_video_mask or "
                           "vace_reference_image", request.vace_scale)
        return
    config = pipe.dit.config
    if not config.vace_layers:
        raise ValueError(f"vace_video / vace_video_mask / vace_reference_image need a VACE model "
                         f"(Wan2.1-VACE); the loaded {config.variant} DiT has no VACE blocks")
    if reference is not None:
        ref_pixels = reference_pixels(pipe, request)
    if request.vace_video is None:
        video = torch.zeros(1, 3, request.num_frames, request.height, request.width, device=pipe.device)
    else:
        video = video_pixels(pipe, request, request.vace_video, "vace_video")
    if request.vace_video_mask is None:
        mask = torch.ones_like(video)
    else:
        mask = video_pixels(pipe, request, request.vace_video_mask, "vace_video_mask", low=0.0, high=1.0)
    inactive = pipe.encode_video(video * (1 - mask), request)
    reactive = pipe.encode_video(video * mask, request)
    masks = mask_latents(mask[0, 0], inactive.shape[2], pipe.vae_spatial_factor).to(inactive)
    context = torch.cat([inactive, reactive, masks], dim=1)
    if reference is not None:
        latents = pipe.encode_video(ref_pixels, request)
        lead = context.new_zeros(context[:, :, :1].shape)
        lead[:, :latents.shape[1]] = latents
        context = torch.cat([lead, context], dim=2)
        cond.leading_frames_to_drop = 1
    cond.shared["vace_context"] = context
    cond.shared["vace_scale"] = request.vace_scale
    logger.debug("VACE: vace_context %s, scale %s", tuple(context.shape), request.vace_scale)
