"""Two-expert (MoE) sampling of Wan2.2-A14B: which expert runs a step, and with which guidance.

The A14B models are two full DiTs of one architecture: the high-noise expert runs while the integer
timestep ``t`` is at least ``boundary * num_train_timesteps``, the low-noise expert after. Both CFG
branches of a step use the same expert, each expert has its own guidance scale, and one solver runs
across the switch (its multistep history is kept). Released values: T2V-A14B boundary 0.875 with
guidance (3.0 low, 4.0 high); I2V-A14B boundary 0.900 with (3.5, 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import finite_number

__all__ = ["ExpertSwitch"]

HIGH, LOW = "high_noise", "low_noise"


@dataclass(frozen=True)
class ExpertSwitch:
    """The official expert rule: ``boundary`` as a fraction of the training timesteps, and the guidance
    pair in the official order ``(low-noise scale, high-noise scale)``."""

    boundary: float
    guidance: tuple[float, float]
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        finite_number("boundary", self.boundary, low=0.0, high=1.0)
        if len(self.guidance) != 2:
            raise ValueError(f"guidance must be a (low-noise, high-noise) pair, got {self.guidance!r}")
        for name, value in zip(("guidance[0] (low noise)", "guidance[1] (high noise)"), self.guidance):
            finite_number(name, value)

    def expert(self, timestep: torch.Tensor | int) -> str:
        """``"high_noise"`` while ``int(t) >= boundary * num_train_timesteps``, else ``"low_noise"``."""
        return HIGH if int(timestep) >= self.boundary * self.num_train_timesteps else LOW

    def guidance_scale(self, timestep: torch.Tensor | int) -> float:
        """The guidance scale of the expert that runs at ``timestep``."""
        return self.guidance[1] if self.expert(timestep) == HIGH else self.guidance[0]
