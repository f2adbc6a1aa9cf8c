"""PAI Fun Control: the control video's latents in ``y``, and the Fun V1.1 reference image.

A Fun Control DiT (``DiTConfig.conditioning == "control"``) takes the noisy latents, the control video's latents
and the image latents of the I2V layout without its mask (zeros when there is no input image).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from wan_models.dit_config import CLIP_TOKENS_PER_IMAGE

from . import Conditioning
from .image import clip_features, image_pixels, video_pixels

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline
    from ..request import GenerationRequest

logger = logging.getLogger(__name__)


def _is_control_dit(pipe: WanVideoPipeline) -> bool:
    """An image DiT whose input is latents + control latents + image latents (PAI Fun Control)."""
    return pipe.dit.config.conditioning == "control"


def control_video(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> None:
    """``y = [VAE(control_video), image latents or zeros]``; ``clip_feature`` zeros without an input image."""
    if request.control_video is None:
        if request.input_image is not None and _is_control_dit(pipe):
            raise ValueError("the loaded Fun Control DiT takes input_image only together with control_video")
        return
    if not _is_control_dit(pipe):
        config = pipe.dit.config
        raise ValueError(f"control_video needs a PAI Fun Control DiT (control-video and image latents as its "
                         f"conditioning); the loaded {config.variant} DiT has in_dim {config.in_dim}")
    control = pipe.encode_video(video_pixels(pipe, request, request.control_video, "control_video"), request)
    z = pipe.latent_channels
    if "y" in cond.shared:
        image_latents = cond.shared["y"][:, -z:]
    else:
        image_latents = torch.zeros_like(control)
        cond.shared["clip_feature"] = torch.zeros(1, CLIP_TOKENS_PER_IMAGE, pipe.dit.config.clip_dim,
                                                  dtype=pipe.torch_dtype, device=pipe.device)
    cond.shared["y"] = torch.cat([control, image_latents], dim=1)
    logger.debug("control video: y %s", tuple(cond.shared["y"].shape))


def reference_image(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> None:
    """Fun V1.1: ``reference_latents`` (untiled VAE) and the reference's CLIP features as ``clip_feature``."""
    if request.reference_image is None:
        return
    config = pipe.dit.config
    if not config.ref_conv:
        raise ValueError(f"reference_image needs a PAI Fun V1.1 Control DiT (with ref_conv); the loaded "
                         f"{config.variant} DiT has none")
    pixels = image_pixels(pipe, request, request.reference_image, "reference_image")
    cond.shared["reference_latents"] = pipe.encode_video(pixels.unsqueeze(2), request, tiled=False)
    # Replaces the input image's features: the reference decides the CLIP tokens.
    cond.shared["clip_feature"] = clip_features(pipe, pixels, "reference_image")
