"""Pipeline units: one small function per conditioning input, run in order before denoising.

A unit reads the :class:`GenerationRequest`, uses the pipeline's networks and writes what the DiT
needs into the :class:`Conditioning`. A unit whose input is absent does nothing; an input the
loaded models cannot use is an error, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline
    from ..request import GenerationRequest


@dataclass
class Conditioning:
    """What the denoising loop feeds the DiT.

    ``shared`` holds DiT keyword inputs common to both CFG branches (``y``, ``clip_feature``,
    ``reference_latents``, ``camera``, ``vace_context``, ``vace_scale``, ``motion_embedding``);
    ``positive``/``negative`` hold the per-branch ones (``context``).
    """

    noise: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    positive: dict[str, Any] = field(default_factory=dict)
    negative: dict[str, Any] = field(default_factory=dict)
    leading_frames_to_drop: int = 0  # latent frames to remove before decoding (VACE reference)
    # Per-token factor on the timestep ([1, L]) for a DiT with per-token timesteps (TI2V: 0 on the image's
    # tokens), and fix-ups applied to the latents after every solver step (see wan_runtime.step).
    token_timestep_scale: torch.Tensor | None = None
    step_fixups: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)


Unit = Callable[["WanVideoPipeline", "GenerationRequest", Conditioning], None]

# The request inputs that provide ``y``, by ``DiTConfig.conditioning`` (FLF2V adds ``end_image``).
CONDITIONING_INPUTS: dict[str, tuple[str, ...]] = {
    "none": (), "image": ("input_image",), "control": ("control_video",),
    "camera": ("input_image", "camera_control_direction"),
}


def required_inputs(config: Any) -> tuple[str, ...]:
    """The request inputs a DiT of ``config`` cannot run without (its ``y``); one table for the
    pipeline, training and the CLI."""
    if config.conditioning not in CONDITIONING_INPUTS:
        raise ValueError(f"the loaded {config.variant} DiT takes {config.y_channels} conditioning channels, "
                         "which no known input provides")
    needed = CONDITIONING_INPUTS[config.conditioning]
    return needed + ("end_image",) if config.image_pos_emb else needed
