"""Image conditioning (I2V, first+last frame FLF2V, PAI Fun InP, Wan2.2-I2V-A14B): ``y`` and ``clip_feature``.

``y`` is a 4-channel frame mask followed by the VAE latents of the video ``[image, grey...(, end_image)]``;
``clip_feature`` holds the CLIP features of the first image (and of the last one for FLF2V). The
helpers here (image/video pixels, CLIP features) are shared by the other conditioning units.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

from ..images import image_to_tensor, resize, video_to_tensor
from . import Conditioning

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline
    from ..request import GenerationRequest

logger = logging.getLogger(__name__)

MASK_CHANNELS = 4  # one mask channel per video frame folded into a latent frame (the VAE's time factor)


def image_pixels(pipe: WanVideoPipeline, request: GenerationRequest, image: Image.Image, name: str) -> torch.Tensor:
    """``image`` resized to the video size (Pillow bicubic), as ``[1, 3, H, W]`` in [-1, 1] on the device."""
    resized = resize(image, request.width, request.height, name)
    return image_to_tensor(resized, name=name).unsqueeze(0).to(pipe.device)


def video_pixels(pipe: WanVideoPipeline, request: GenerationRequest, frames: Sequence[Image.Image], name: str,
                 low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """``frames`` as ``[1, 3, T, H, W]`` in ``[low, high]`` on the device.

    Videos are not resampled (as in the reference): they must already have ``num_frames`` frames
    at ``(width, height)``, else this raises saying what to change.
    """
    if isinstance(frames, Image.Image):
        raise TypeError(f"{name} must be a list of frames, got a single image")
    if isinstance(frames, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a list of PIL frames, got the path {frames!r}: read it with "
                        "wan_runtime.load_video")
    frames = list(frames)
    bad = next((i for i, frame in enumerate(frames) if not isinstance(frame, Image.Image)), None)
    if bad is not None:
        raise TypeError(f"{name} must be a list of PIL frames; frame {bad} is a {type(frames[bad]).__name__}")
    if len(frames) != request.num_frames:
        count = len(frames)
        fix = (f"pass num_frames={count}" if count % 4 == 1
               else f"trim the video to 4k+1 frames (e.g. {count - (count - 1) % 4})")
        raise ValueError(f"{name} has {count} frames, but num_frames is {request.num_frames}; {fix}")
    pixels = video_to_tensor(frames, low, high, name=name)
    if pixels.shape[-2:] != (request.height, request.width):
        raise ValueError(f"{name} frames are {frames[0].size}, expected (width, height) = "
                         f"({request.width}, {request.height}); resize the video first")
    return pixels.to(pipe.device)


def clip_features(pipe: WanVideoPipeline, pixels: torch.Tensor, name: str) -> torch.Tensor:
    """CLIP features ``[1, tokens, clip_dim]`` of ``pixels [1, 3, H, W]`` in [-1, 1], in the pipeline dtype."""
    if pipe.image_encoder is None:
        raise ValueError(f"{name} needs the CLIP image encoder "
                         "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), which is not loaded")
    return pipe.image_encoder.encode_image(pixels).to(dtype=pipe.torch_dtype)


def frame_mask(num_frames: int, has_end: bool, height: int, width: int) -> torch.Tensor:
    """The ``[1, 4, F_lat, height, width]`` mask of ``y``: which video frames are given.

    Channel ``c`` of latent frame ``f`` marks video frame ``max(0, 4f - 3 + c)``; frame 0 fills all
    four slots of latent frame 0, so an end image sets only channel 3 of the last latent frame.
    """
    given = torch.zeros(num_frames)
    given[0] = 1.0
    if has_end:
        given[-1] = 1.0
    padded = torch.cat([given[:1].expand(MASK_CHANNELS - 1), given])
    per_latent = padded.view(-1, MASK_CHANNELS).t()
    return per_latent[None, :, :, None, None].expand(-1, -1, -1, height, width)


def image(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> None:
    """``y`` from ``input_image`` (and ``end_image``) for DiTs whose ``y`` holds image latents, and
    ``clip_feature`` for those with the CLIP branch (the Wan 2.2 I2V-A14B experts take ``y`` only).

    Control-Camera DiTs get only ``clip_feature`` here: their ``y`` comes from the camera unit. TI2V
    (image latents fused into the noise) is the fused_image unit's.
    """
    if request.input_image is None:
        if request.end_image is not None:
            raise ValueError("end_image needs input_image: first+last frame generation takes both")
        return
    config = pipe.dit.config
    if config.fuses_image_latents:
        return
    if not config.image_input and config.conditioning != "image":
        given = "input_image and end_image" if request.end_image is not None else "input_image"
        raise ValueError(f"{given} given, but the loaded {config.variant} DiT has no image input; load an "
                         "image model (Wan2.1-I2V / FLF2V, Wan2.2-I2V-A14B or TI2V-5B, PAI Fun InP / Control / "
                         "Control-Camera)")
    camera_model = config.camera_in_dim is not None
    if camera_model and request.end_image is not None:
        raise ValueError("end_image is not supported by Control-Camera DiTs, which take input_image only")
    if config.image_pos_emb and request.end_image is None:
        raise ValueError("the loaded FLF2V DiT generates from a first and a last frame: pass end_image with "
                         "input_image")
    if request.end_image is not None and request.num_frames < 2:
        raise ValueError("end_image needs num_frames >= 5: with one frame the first and last frame coincide")
    if request.end_image is not None and config.family == "wan2.2":
        logger.info("end_image on the %s DiT: the last frame goes into y as DiffSynth-Studio does; the official "
                    "Wan2.2 code has no last-frame input for this model", config.variant)
    first = image_pixels(pipe, request, request.input_image, "input_image")
    end = None if request.end_image is None else image_pixels(pipe, request, request.end_image, "end_image")
    if config.image_input:
        features = clip_features(pipe, first, "input_image")
        if end is not None and config.image_pos_emb:
            features = torch.cat([features, clip_features(pipe, end, "end_image")], dim=1)
        cond.shared["clip_feature"] = features
    if not camera_model:
        cond.shared["y"] = _image_y(pipe, request, first, end)
    logger.debug("image conditioning: clip_feature %s, y %s",
                 *(tuple(cond.shared[k].shape) if k in cond.shared else None for k in ("clip_feature", "y")))


def _image_y(pipe: WanVideoPipeline, request: GenerationRequest, first: torch.Tensor,
             end: torch.Tensor | None) -> torch.Tensor:
    """Mask ``[1, 4, F_lat, h, w]`` + VAE latents of ``[first, grey..., (end)]`` on channels."""
    frames = [first.unsqueeze(2)]
    grey = request.num_frames - 1 - (end is not None)
    frames.append(first.new_zeros(1, 3, grey, request.height, request.width))
    if end is not None:
        frames.append(end.unsqueeze(2))
    latents = pipe.encode_video(torch.cat(frames, dim=2), request)
    mask = frame_mask(request.num_frames, end is not None, latents.shape[3], latents.shape[4])
    return torch.cat([mask.to(latents), latents], dim=1)
