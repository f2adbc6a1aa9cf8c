"""Bookkeeping shared by the official Wan multistep solvers (UniPC and DPM++).

Both take an integer timestep schedule built in float64 with numpy (``numpy.linspace`` rounding
decides which integer ``sigma * 1000`` truncates to, so it is reproduced exactly), keep a short
history of x0 predictions and advance a step counter; a ``set_timesteps`` call resets all of it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from wan_runtime.schedulers.base import Timestep, as_scalar_timestep, check_shift, check_steps, shift_sigmas

logger = logging.getLogger(__name__)


class FlowMultistepSolver:
    """Schedule, step counter and x0 history of a multistep flow solver; subclasses do the update.

    ``shift`` is the time shift used when ``set_timesteps`` is given none (Wan T2V default: 5).
    """

    name = "multistep"

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        self.shift = check_shift(shift)
        self.num_train_timesteps = check_steps(num_train_timesteps)
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self.sigmas = torch.empty(0)
        self._reset()

    def _unshifted_sigmas(self, steps: int) -> np.ndarray:
        """The ``steps`` float64 sigmas before the time shift (each solver has its own start)."""
        raise NotImplementedError

    def _reset(self) -> None:
        self._index = 0
        self._x0_history: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, shift: float | None = None) -> None:
        """Build the schedule of a new generation and forget the previous one's history.

        Timesteps are ``sigma * 1000`` truncated to int64; ``sigmas`` (float32) ends with a 0.
        """
        steps = check_steps(num_inference_steps)
        shift = self.shift if shift is None else check_shift(shift)
        sigmas = shift_sigmas(self._unshifted_sigmas(steps), shift)
        self.timesteps = torch.from_numpy(sigmas * self.num_train_timesteps).to(torch.int64)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self._reset()
        logger.debug("%s schedule: %d steps, shift %g", self.name, steps, shift)

    def _update(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The sample after step ``i``, from sample ``x`` (at least float32) and its x0 prediction ``x0``."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from ``timestep`` (the next entry of ``.timesteps``) to the next sigma.

        The arithmetic runs in at least float32; the result has ``sample``'s dtype. After the last
        step the result is the final x0 prediction.
        """
        steps = len(self.timesteps)
        if steps == 0:
            raise RuntimeError(f"{self.name}: no schedule yet, call set_timesteps first")
        i = self._index
        if i >= steps:
            raise RuntimeError(f"{self.name}: all {steps} steps are done; "
                               "call set_timesteps for a new generation")
        expected = int(self.timesteps[i])
        given = as_scalar_timestep(timestep)
        if float(given) != expected:
            raise ValueError(f"{self.name}: step {i} of {steps} expects timestep {expected}, "
                             f"got {given.item()!r} (steps must follow .timesteps in order)")
        dtype = torch.promote_types(sample.dtype, torch.float32)  # half precision runs in float32
        x = sample.to(dtype)
        x0 = x - self.sigmas[i] * model_output.to(dtype)
        out = self._update(i, x, x0)
        self._index += 1
        return out.to(sample.dtype)
