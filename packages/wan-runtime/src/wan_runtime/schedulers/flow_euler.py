"""Flow-matching Euler scheduler, configured as DiffSynth-Studio's Wan video pipeline uses it.

DiffSynth builds its ``FlowMatchScheduler`` with ``sigma_min=0``, ``sigma_max=1`` and
``extra_one_step=True``: ``n`` sigmas evenly spaced from ``denoising_strength`` down to (but not
including) 0, time-shifted, with timesteps ``sigma * 1000`` as float32. The same object also
serves training (noising, velocity target, timestep loss weights).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from wan_runtime.schedulers.base import Timestep, as_scalar_timestep, check_shift, check_steps, shift_sigmas

logger = logging.getLogger(__name__)


class FlowEulerScheduler:
    """First-order (Euler) sampler of the flow ODE ``dx/dsigma = v``; also the training noise schedule.

    ``shift`` is the time shift used when ``set_timesteps`` is given none (Wan T2V default: 5).
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        self.shift = check_shift(shift)
        self.num_train_timesteps = check_steps(num_train_timesteps)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._training_weights: torch.Tensor | None = None

    def set_timesteps(
        self,
        num_inference_steps: int,
        denoising_strength: float = 1.0,
        shift: float | None = None,
        training: bool = False,
        step_list: Sequence[float] | None = None,
    ) -> None:
        """Build the schedule of one generation (or, with ``training=True``, the training schedule).

        ``denoising_strength < 1`` starts at a lower noise level (video-to-video). ``training`` also
        computes the per-timestep loss weights that :meth:`training_weight` returns. ``step_list``
        replaces the evenly spaced points with published ones (LightX2V's ``denoising_step_list``):
        timesteps in (0, 1000] on the unshifted grid, strictly decreasing, one per step, each
        becoming the sigma ``shift(t / 1000)``; it starts from pure noise.
        """
        steps = check_steps(num_inference_steps)
        if not 0.0 <= denoising_strength <= 1.0:
            raise ValueError(f"denoising_strength must be in [0, 1], got {denoising_strength!r}")
        shift = self.shift if shift is None else check_shift(shift)

        if step_list is None:
            sigmas = torch.linspace(float(denoising_strength), 0.0, steps + 1)[:-1]
        else:
            sigmas = self._listed_sigmas(step_list, steps, denoising_strength)
        sigmas = shift_sigmas(sigmas, shift)
        self.timesteps = sigmas * self.num_train_timesteps
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self._training_weights = None
        if training:
            if steps != self.num_train_timesteps:
                logger.warning("training weights assume num_inference_steps == num_train_timesteps "
                               "(%d), got %d", self.num_train_timesteps, steps)
            self._training_weights = self._loss_weights(self.timesteps, steps)
        logger.debug("euler schedule: %d steps, shift %g, strength %g, training %s",
                     steps, shift, denoising_strength, training)

    def _listed_sigmas(self, step_list: Sequence[float], steps: int, denoising_strength: float) -> torch.Tensor:
        """The unshifted sigmas ``t / num_train_timesteps`` of a published step list, checked."""
        values = [float(t) for t in step_list]
        if len(values) != steps:
            raise ValueError(f"step_list {list(step_list)!r} has {len(values)} timesteps for {steps} steps")
        if denoising_strength != 1.0:
            raise ValueError(f"step_list starts from pure noise; denoising_strength={denoising_strength} does "
                             "not combine with it")
        top = self.num_train_timesteps
        for i, t in enumerate(values):
            if not 0.0 < t <= top or (i and t >= values[i - 1]):
                raise ValueError(f"step_list[{i}]={step_list[i]!r}: the list must be strictly decreasing "
                                 f"timesteps in (0, {top}], got {list(step_list)!r}")
        return torch.tensor(values, dtype=torch.float32) / top

    @staticmethod
    def _loss_weights(timesteps: torch.Tensor, steps: int) -> torch.Tensor:
        """DiffSynth's bell-shaped weights: ``exp(-2((t - n/2)/n)^2)``, minimum shifted to 0, mean 1."""
        bell = torch.exp(-2 * ((timesteps - steps / 2) / steps) ** 2)
        bell = bell - bell.min()
        return bell * (steps / bell.sum())

    @property
    def training_weights(self) -> torch.Tensor:
        """Loss weight of every scheduled timestep (only after ``set_timesteps(..., training=True)``)."""
        if self._training_weights is None:
            raise RuntimeError("training weights exist only after set_timesteps(..., training=True)")
        return self._training_weights

    def index_of(self, timestep: Timestep) -> int:
        """Index of the scheduled timestep nearest to ``timestep`` (how DiffSynth locates a step)."""
        if len(self.timesteps) == 0:
            raise RuntimeError("no schedule yet: call set_timesteps first")
        return int(torch.argmin((self.timesteps - as_scalar_timestep(timestep)).abs()))

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``timestep`` to the next scheduled sigma (0 after the last)."""
        i = self.index_of(timestep)
        return sample + model_output * (self.sigmas[i + 1] - self.sigmas[i])

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """The noised sample ``(1 - sigma) * original + sigma * noise`` at the nearest scheduled timestep."""
        sigma = self.sigmas[self.index_of(timestep)]
        return (1 - sigma) * original + sigma * noise

    def training_target(self, sample: torch.Tensor, noise: torch.Tensor,
                        timestep: Timestep | None = None) -> torch.Tensor:
        """The velocity the network learns, ``noise - sample``; the same at every timestep."""
        return noise - sample

    def training_weight(self, timestep: Timestep) -> torch.Tensor:
        """Loss weight of the scheduled timestep nearest to ``timestep`` (training schedule only)."""
        return self.training_weights[self.index_of(timestep)]
