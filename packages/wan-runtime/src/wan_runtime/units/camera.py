"""PAI Fun Control-Camera: a preset camera move as per-pixel Plücker rays, and the first frame in ``y``.

A camera entry is the 19 numbers of a CameraCtrl pose line: ``[frame, fx, fy, cx, cy, 0, 0,
w2c (3x4, row-major)]`` with intrinsics normalised by the image size. A preset moves the camera by
adding ``speed`` per frame to ``w2c[0, 2]`` (left/right) and ``w2c[1, 2]`` (up/down), exactly as
the reference does (it tilts the view axis rather than translating the camera).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch

from ..request import DEFAULT_CAMERA_ORIGIN
from . import Conditioning
from .image import image_pixels

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline
    from ..request import GenerationRequest

logger = logging.getLogger(__name__)

POSE_WIDTH, POSE_HEIGHT = 1280, 720  # the frame size the preset intrinsics were written for
ENTRY_LENGTH = 19
INTRINSICS = slice(1, 5)  # fx, fy, cx, cy (normalised)
W2C = slice(7, 19)  # world-to-camera matrix, 3x4 row-major
HORIZONTAL_ENTRY = 9  # w2c[0, 2]
VERTICAL_ENTRY = 13  # w2c[1, 2]
PLUCKER_CHANNELS = 6  # (origin x direction, direction)
FRAMES_PER_LATENT = 4  # the VAE's time factor: frames folded into channels per latent frame

# Direction preset -> (sign of the step on HORIZONTAL_ENTRY, sign on VERTICAL_ENTRY).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "Left": (1, 0), "Right": (-1, 0), "Up": (0, 1), "Down": (0, -1),
    "LeftUp": (1, 1), "LeftDown": (1, -1), "RightUp": (-1, 1), "RightDown": (-1, -1),
}


def camera_entries(direction: str, num_frames: int, speed: float,
                   origin: Sequence[float]) -> torch.Tensor:
    """``[num_frames, 19]`` float64 pose entries: ``origin`` moved by ``speed`` per frame along ``direction``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown camera_control_direction {direction!r}; choose one of {list(DIRECTIONS)}")
    if len(origin) != ENTRY_LENGTH:
        raise ValueError(f"camera_control_origin must hold {ENTRY_LENGTH} numbers "
                         f"(frame, fx, fy, cx, cy, 0, 0, 3x4 world-to-camera), got {len(origin)}")
    horizontal, vertical = DIRECTIONS[direction]
    entries = torch.tensor(origin, dtype=torch.float64).repeat(num_frames, 1)
    steps = torch.arange(num_frames, dtype=torch.float64) * speed
    entries[:, HORIZONTAL_ENTRY] += horizontal * steps
    entries[:, VERTICAL_ENTRY] += vertical * steps
    return entries


def pixel_intrinsics(normalised: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(fx, fy, cx, cy)`` in pixels for a ``width x height`` frame, float32.

    The focal length along the axis the frame is relatively shorter in is stretched so that the
    field of view matches the 1280x720 pose frame cropped to the requested aspect.
    """
    fx, fy, cx, cy = normalised.tolist()
    pose_aspect = POSE_WIDTH / POSE_HEIGHT
    if pose_aspect > width / height:
        fx = height * pose_aspect * fx / width
    else:
        fy = width / pose_aspect * fy / height
    return torch.tensor([fx * width, fy * height, cx * width, cy * height], dtype=torch.float64).float()


def relative_poses(w2c: torch.Tensor) -> torch.Tensor:
    """Camera-to-world ``[F, 4, 4]`` float32 relative to frame 0 (frame 0 = identity), from ``w2c [F, 3, 4]``."""
    frames = w2c.shape[0]
    w2c_4x4 = torch.eye(4, dtype=w2c.dtype).repeat(frames, 1, 1)
    w2c_4x4[:, :3] = w2c
    relative = w2c_4x4[0] @ torch.linalg.inv(w2c_4x4)
    relative[0] = torch.eye(4, dtype=w2c.dtype)
    return relative.float()


def camera_rays(intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unit ray directions ``[H, W, 3]`` in camera space through each pixel's centre."""
    fx, fy, cx, cy = intrinsics
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                                torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    rays = torch.stack([(cols - cx) / fx, (rows - cy) / fy, torch.ones_like(rows)], dim=-1)
    return rays / rays.norm(dim=-1, keepdim=True)


def plucker_embedding(direction: str, num_frames: int, height: int, width: int, speed: float = 1 / 54,
                      origin: Sequence[float] | None = None) -> torch.Tensor:
    """Plücker coordinates ``[num_frames, height, width, 6]`` = (o x d, d) of every pixel's ray."""
    entries = camera_entries(direction, num_frames, speed, DEFAULT_CAMERA_ORIGIN if origin is None else origin)
    c2w = relative_poses(entries[:, W2C].view(num_frames, 3, 4))
    rays = camera_rays(pixel_intrinsics(entries[0, INTRINSICS], height, width), height, width)
    directions = rays @ c2w[:, None, :3, :3].transpose(-1, -2)  # [F, H, W, 3] in world space
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return torch.cat([torch.linalg.cross(origins, directions, dim=-1), directions], dim=-1)


def pack_camera(plucker: torch.Tensor) -> torch.Tensor:
    """``[F, H, W, 6]`` -> ``[1, 24, F_lat, H, W]``: frame 0 repeated to fill latent frame 0, then
    each group of 4 frames folded into channels (channel ``4 c + k`` = component ``c`` of frame ``k``)."""
    video = plucker.permute(3, 0, 1, 2)  # [6, F, H, W]
    padded = torch.cat([video[:, :1].expand(-1, FRAMES_PER_LATENT - 1, -1, -1), video], dim=1)
    channels, frames, height, width = padded.shape
    grouped = padded.view(channels, frames // FRAMES_PER_LATENT, FRAMES_PER_LATENT, height, width)
    return grouped.transpose(1, 2).reshape(1, channels * FRAMES_PER_LATENT, -1, height, width)


def camera_control(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> None:
    """``camera [1, 24, F_lat, H, W]`` for the camera adapter and ``y`` = input image latents in frame 0."""
    config = pipe.dit.config
    direction = request.camera_control_direction
    if direction is None:
        if config.camera_in_dim is not None and request.input_image is not None:
            raise ValueError(f"the loaded Control-Camera DiT needs camera_control_direction with input_image; "
                             f"choose one of {list(DIRECTIONS)}")
        return
    if config.camera_in_dim is None:
        raise ValueError(f"camera_control_direction needs a PAI Fun Control-Camera DiT (with a camera adapter); "
                         f"the loaded {config.variant} DiT has none")
    if config.camera_in_dim != PLUCKER_CHANNELS * FRAMES_PER_LATENT:
        raise ValueError(f"the camera adapter takes {config.camera_in_dim} channels; the Plücker packing gives "
                         f"{PLUCKER_CHANNELS * FRAMES_PER_LATENT}")
    if request.input_image is None:
        raise ValueError("camera control animates input_image: pass input_image with camera_control_direction")
    plucker = plucker_embedding(direction, request.num_frames, request.height, request.width,
                                request.camera_control_speed, request.camera_control_origin)
    cond.shared["camera"] = pack_camera(plucker).to(device=pipe.device, dtype=pipe.torch_dtype)
    pixels = image_pixels(pipe, request, request.input_image, "input_image")
    first = pipe.encode_video(pixels.unsqueeze(2), request, tiled=False)
    y = torch.zeros_like(cond.latents)
    y[:, :, :1] = first
    cond.shared["y"] = y
    logger.debug("camera control %r: camera %s, y %s", direction, tuple(cond.shared["camera"].shape), tuple(y.shape))
