"""Limits a request must pass before any network runs: size caps and a memory estimate.

``--width 100000`` or ``num_frames=100000`` would otherwise start computing and never finish (or
fail hours later out of memory). :class:`RequestLimits` caps the frame count and the pixels per
frame (defaults well above the released models' 1280x720, 81 frames; raise them with
``WAN_MAX_FRAMES`` / ``WAN_MAX_PIXELS`` or ``pipe.limits``), and :func:`estimate_memory` sizes the
activations a request needs from the loaded networks, to refuse one that cannot fit in the memory the
device has free (or ``WAN_MAX_MEMORY_GB``). The estimate is deliberately coarse (peak tensors of a
DiT block, of the VAE decoder and the output video), so it only refuses requests far out of reach.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pipeline import WanVideoPipeline
    from .request import GenerationRequest

logger = logging.getLogger(__name__)

__all__ = ["MemoryEstimate", "RequestLimits", "RequestTooLarge", "available_memory", "estimate_memory"]

GIB = 1024 ** 3
DEFAULT_MAX_FRAMES = 1025          # ~64 s at 16 fps; the released models are trained at 81
DEFAULT_MAX_PIXELS = 2560 * 1440   # per frame; 4x the released models' 1280x720
QUADRATIC_BACKENDS = ("math",)     # attention backends that materialise the [L, L] score matrix


class RequestTooLarge(ValueError):
    """A request above a cap, or needing more memory than the device has; the message names the value,
    the limit and the memory it would take."""


def _env_number(name: str, default: float | None, kind: type) -> float | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not number > 0:
        raise ValueError(f"${name} must be > 0, got {value!r}")
    return number


@dataclass
class MemoryEstimate:
    """Bytes a request needs on the compute device beyond the loaded weights, by stage."""

    tokens: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The peak: the parts run one after another (denoising, then decoding)."""
        return max(self.parts.values(), default=0)

    def describe(self) -> str:
        return ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in self.parts.items())


@dataclass
class RequestLimits:
    """Caps on one request: frames, pixels per frame, and memory (``None``: what the device has free)."""

    max_frames: int = DEFAULT_MAX_FRAMES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_memory_gb: float | None = None

    @classmethod
    def from_env(cls) -> "RequestLimits":
        """Defaults, overridden by ``WAN_MAX_FRAMES``, ``WAN_MAX_PIXELS`` and ``WAN_MAX_MEMORY_GB``."""
        return cls(max_frames=_env_number("WAN_MAX_FRAMES", DEFAULT_MAX_FRAMES, int),
                   max_pixels=_env_number("WAN_MAX_PIXELS", DEFAULT_MAX_PIXELS, int),
                   max_memory_gb=_env_number("WAN_MAX_MEMORY_GB", None, float))

    def check_size(self, request: "GenerationRequest", estimate: MemoryEstimate | None = None) -> None:
        """Refuse a frame count or frame size above the caps (needs no network); with the loaded
        networks' ``estimate`` the message also says the memory the request would take."""
        need = "" if estimate is None else f" (it would need about {estimate.total / GIB:.1f} GiB beyond the weights)"
        if request.num_frames > self.max_frames:
            raise RequestTooLarge(f"num_frames={request.num_frames} is above the limit of {self.max_frames} frames"
                                  f"{need}; generate fewer frames, or raise the limit with WAN_MAX_FRAMES "
                                  "(pipe.limits.max_frames in Python)")
        pixels = request.height * request.width
        if pixels > self.max_pixels:
            raise RequestTooLarge(f"{request.width}x{request.height} ({pixels:,} pixels per frame) is above the limit "
                                  f"of {self.max_pixels:,} pixels{need}; lower width/height, or raise the limit with "
                                  "WAN_MAX_PIXELS (pipe.limits.max_pixels in Python)")

    def check(self, pipe: "WanVideoPipeline", request: "GenerationRequest") -> MemoryEstimate:
        """Both checks for the loaded networks: the caps (naming the memory needed), then the memory."""
        estimate = estimate_memory(pipe, request)
        self.check_size(request, estimate)
        return self.check_memory(pipe, request, estimate)

    def check_memory(self, pipe: "WanVideoPipeline", request: "GenerationRequest",
                     estimate: MemoryEstimate | None = None) -> MemoryEstimate:
        """Refuse a request whose estimated activations exceed the free memory of the compute device
        (or ``max_memory_gb``); returns the estimate."""
        estimate = estimate or estimate_memory(pipe, request)
        if self.max_memory_gb is not None:
            limit, what = int(self.max_memory_gb * GIB), f"the limit of {self.max_memory_gb:g} GiB (WAN_MAX_MEMORY_GB)"
        else:
            free = available_memory(pipe.device)
            if free is None:
                return estimate
            limit, what = free, f"the {free / GIB:.1f} GiB free on {pipe.device}"
        logger.debug("request needs about %.2f GiB (%s); limit %.2f GiB", estimate.total / GIB,
                     estimate.describe(), limit / GIB)
        if estimate.total > limit:
            raise RequestTooLarge(
                f"{request.width}x{request.height}, {request.num_frames} frames needs about "
                f"{estimate.total / GIB:.1f} GiB beyond the weights ({estimate.describe()}; {estimate.tokens:,} DiT "
                f"tokens), more than {what}; lower width/height/num_frames, use sliding windows or tiled=True")
        return estimate


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA free memory plus what torch's cache holds unused;
    for the CPU, the memory the OS reports available. ``None`` when it cannot be known."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def estimate_memory(pipe: "WanVideoPipeline", request: "GenerationRequest") -> MemoryEstimate:
    """Peak bytes of activations for ``request`` on the loaded networks (weights not counted).

    DiT: per token, the hidden state, its residual and q/k/v/out (``dim`` each) plus the FFN's two
    ``ffn_dim`` tensors, times the batch (2 with ``cfg_merge``), plus the ``[heads, L, L]`` scores for a
    quadratic attention backend. VAE decode: the decoder's widest full-resolution tensors over a 4-frame
    chunk of a tile (or the whole frame untiled), plus the float32 video and its blend weights.
    """
    config = pipe.dit.config
    factor = pipe.vae_spatial_factor
    frames = request.latent_frames + (1 if request.vace_reference_image is not None else 0)
    if request.sliding_window_size is not None:
        frames = min(frames, request.sliding_window_size)
    _, ph, pw = config.patch_size
    tokens = frames * math.ceil(request.height / factor / ph) * math.ceil(request.width / factor / pw)
    batch = 2 if request.cfg_merge and request.uses_cfg else 1
    itemsize = torch.empty(0, dtype=pipe.torch_dtype).element_size()
    dit = batch * tokens * (6 * config.dim + 2 * config.ffn_dim) * itemsize
    if pipe.attention_backend in QUADRATIC_BACKENDS:
        dit += batch * config.num_heads * tokens * tokens * 4
    parts = {"DiT": dit}
    if pipe.vae is not None:
        vae_dim = pipe.vae.config.dim
        tile = (min(request.height, request.tile_size[0] * factor) * min(request.width, request.tile_size[1] * factor)
                if request.tiled else request.height * request.width)
        video = 3 * request.num_frames * request.height * request.width
        parts["VAE decode"] = 6 * vae_dim * 4 * tile * itemsize + 2 * video * 4
    return MemoryEstimate(tokens, parts)
