"""Speed-control motion controller (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1).

Maps a motion bucket id to an offset of the DiT's 6-way block modulation: sinusoid of ``id * 10``
then Linear, SiLU, Linear, SiLU, Linear to ``6 * dim``. Keys ``linear.{0,2,4}.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from .dit import sinusoid
from .dit_config import MotionControllerConfig


class MotionController(nn.Module):
    """Motion bucket id -> offset of the DiT's block modulation (see the module docstring)."""

    dtype_parameters: tuple[str, ...] = ("linear.0.weight",)  # see wan_models.ops

    def __init__(self, config: MotionControllerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MotionControllerConfig()
        self.linear = nn.Sequential(nn.Linear(config.freq_dim, config.dim), nn.SiLU(),
                                    nn.Linear(config.dim, config.dim), nn.SiLU(),
                                    nn.Linear(config.dim, 6 * config.dim))

    def forward(self, motion_bucket_id: torch.Tensor) -> torch.Tensor:
        """``motion_bucket_id [B]`` -> ``[B, 6*dim]`` in float32 (pass to the DiT as ``motion_embedding``)."""
        weight = self.linear[0].weight
        emb = sinusoid(motion_bucket_id.reshape(-1) * 10, self.config.freq_dim)
        return self.linear(emb.to(weight.dtype)).float()
