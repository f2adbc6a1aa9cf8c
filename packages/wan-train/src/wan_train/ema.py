"""An exponential moving average of the trained weights (``--ema_decay``).

With a constant learning rate a small DiT's samples swing from checkpoint to checkpoint; the average
of the last few thousand steps' weights generates better than any one of them. The average is kept
in float32 beside the weights, updated after every optimizer step as
``ema += (1 - d) * (weight - ema)`` with ``d = min(decay, (1 + step) / (10 + step))`` (the warm-up
lets early averages forget the random start), and written to the checkpoints in their place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file

from .args import TrainingError

__all__ = ["EMA", "ema_decay_at"]


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used for the update after optimizer step ``step`` (1-based): warmed up, capped at ``decay``."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """The float32 moving average of the named parameters ``params`` (the trainable weights)."""

    def __init__(self, params: Iterable[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise TrainingError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = dict(params)
        self.average = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights (call once after optimizer step ``step``)."""
        weight = 1.0 - ema_decay_at(self.decay, step)
        names = list(self.params)
        torch._foreach_lerp_([self.average[n] for n in names], [self.params[n].detach().float() for n in names],
                             weight)

    def weights(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The averages of ``names``, in each parameter's own dtype (what a checkpoint stores)."""
        return {name: self.average[name].to(self.params[name].dtype) for name in names}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    def load(self, path: Path) -> None:
        """Restore the averages a resume state holds; the names must be this run's trainable weights."""
        if not path.is_file():
            raise TrainingError(f"--resume: {path.parent} holds no moving average ({path.name}); it was saved by a "
                                "run without --ema_decay")
        saved = load_file(str(path))
        if set(saved) != set(self.average):
            raise TrainingError(f"--resume: the moving average in {path} is of other weights than this run's (e.g. "
                                f"{sorted(set(saved) ^ set(self.average))[:3]})")
        for name, value in saved.items():
            self.average[name].copy_(value)
