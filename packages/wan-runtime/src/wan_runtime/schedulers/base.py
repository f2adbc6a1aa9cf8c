"""The interface every sampler offers a denoising loop, and the schedule helpers they share.

Flow-matching convention used throughout: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the
network predicts the velocity ``v = noise - x0``, so ``x0 = x_sigma - sigma * v``.
"""

from __future__ import annotations

import operator
from typing import Protocol, TypeVar, Union

import torch

Timestep = Union[torch.Tensor, int, float]
_Array = TypeVar("_Array")


class Scheduler(Protocol):
    """A sampler as the denoising loop drives it.

    ``set_timesteps`` builds a fresh schedule and forgets any previous generation. The loop then
    evaluates the model at each entry of ``timesteps`` in order and hands its velocity prediction
    to ``step``, which returns the sample for the next entry. ``sigmas`` has one entry more than
    ``timesteps``: the noise level after the last step, 0.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def set_timesteps(self, num_inference_steps: int, *, shift: float | None = None) -> None: ...

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor) -> torch.Tensor: ...


def check_steps(num_inference_steps: int) -> int:
    """``num_inference_steps`` as an int, or a ValueError naming the bad value."""
    try:
        if isinstance(num_inference_steps, bool):
            raise TypeError
        steps = operator.index(num_inference_steps)
    except TypeError:
        steps = 0
    if steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    return steps


def check_shift(shift: float) -> float:
    """``shift`` as a float, or a ValueError: the time shift must be a positive number."""
    try:
        value = float(shift)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    return value


def shift_sigmas(sigmas: _Array, shift: float) -> _Array:
    """Wan's time shift ``shift*s / (1 + (shift-1)*s)``: spends more steps at high noise for ``shift > 1``.

    Works on torch tensors and numpy arrays alike; the arithmetic happens in their own dtype.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)  # type: ignore[operator]


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """``lambda = log(alpha) - log(sigma)`` with ``alpha = 1 - sigma`` (-inf at sigma 1, +inf at 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def as_scalar_timestep(timestep: Timestep) -> torch.Tensor:
    """A single timestep (Python number or one-element tensor, any device) as a 0-dim CPU tensor."""
    t = torch.as_tensor(timestep).detach().cpu()
    if t.numel() != 1:
        raise ValueError(f"expected a single timestep, got a tensor of shape {tuple(t.shape)}")
    return t.reshape(())
