"""TI2V-5B image-to-video: the input image's latents are latent frame 0, held fixed through sampling.

As in the official ``WanTI2V.i2v``: with ``mask`` 0 on latent frame 0 and 1 elsewhere, the latents
become ``(1 - mask) * z + mask * latents`` before the loop and after every solver step, and the DiT
sees timestep 0 on the tokens of frame 0 (``t * mask`` per token). Without ``input_image`` the same
DiT generates text-to-video with one timestep everywhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from . import Conditioning
from .image import image_pixels

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline
    from ..request import GenerationRequest

logger = logging.getLogger(__name__)


def frame0_token_scale(latents: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """``[1, L]`` float32: 0 on the tokens of latent frame 0, 1 elsewhere, in the DiT's token order
    (frames x H/ph x W/pw, frame-major) for ``latents [1, C, F, H, W]``."""
    pt, ph, pw = patch_size
    grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
    scale = torch.ones(grid, dtype=torch.float32, device=latents.device)
    scale[0] = 0.0
    return scale.reshape(1, -1)


def replace_frame0(latents: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``latents`` with latent frame 0 replaced by ``z [1, C, 1, H, W]`` (a new tensor)."""
    return torch.cat([z.to(latents), latents[:, :, 1:]], dim=2)


def fused_image(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> None:
    """For a DiT that fuses image latents (TI2V-5B) and an ``input_image``: frame 0 of the latents, its
    tokens' timestep scale and the fix-up that puts it back after every step."""
    config = pipe.dit.config
    if not config.fuses_image_latents or request.input_image is None:
        return
    if request.end_image is not None:
        raise ValueError(f"end_image given, but the loaded {config.variant} DiT (Wan2.2-TI2V-5B) generates from a "
                         "first frame only: pass input_image alone")
    pixels = image_pixels(pipe, request, request.input_image, "input_image")
    z = pipe.encode_video(pixels.unsqueeze(2), request, tiled=False)
    cond.latents = replace_frame0(cond.latents, z)
    cond.token_timestep_scale = frame0_token_scale(cond.latents, config.patch_size)
    cond.step_fixups.append(lambda latents: replace_frame0(latents, z))
    logger.debug("TI2V image: latent frame 0 from input_image %s, %d of %d tokens at t=0", tuple(z.shape),
                 int((cond.token_timestep_scale == 0).sum()), cond.token_timestep_scale.shape[1])
