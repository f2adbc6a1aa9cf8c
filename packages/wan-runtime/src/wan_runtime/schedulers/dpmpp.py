"""DPM-Solver++ (2M, midpoint, x0 prediction): the official Wan 2.1 ``--sample_solver dpm++``.

Behaves as ``FlowDPMSolverMultistepScheduler`` with the schedule ``wan/text2video.py`` gives it
(``get_sampling_sigmas``: evenly spaced from exactly 1 before the shift, so the first timestep is
1000). The first and the last steps are first order; the last one returns the x0 prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from wan_runtime.schedulers.base import log_snr
from wan_runtime.schedulers.multistep import FlowMultistepSolver


class FlowDPMPPScheduler(FlowMultistepSolver):
    """Second-order multistep DPM-Solver++ (Lu et al. 2022) for flow-matching models."""

    name = "dpmpp"

    def _unshifted_sigmas(self, steps: int) -> np.ndarray:
        return np.linspace(1.0, 0.0, steps + 1)[:steps]

    def _update(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``x_(i+1) = (sigma_(i+1)/sigma_i) x - alpha_(i+1) (e^-h - 1) (x0_i + D1/2)``.

        ``D1 = (x0_i - x0_(i-1)) / r0`` with ``r0 = h_prev / h`` on second-order steps, else 0.
        Infinite lambdas at sigma 1 and 0 are harmless: ``e^-h`` is then 0, and at the second
        step ``r0`` is infinite so ``D1`` is 0.
        """
        self._x0_history = (self._x0_history + [x0])[-2:]
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        lam_s = log_snr(sigma_s)
        h = log_snr(sigma_t) - lam_s
        coef = (1 - sigma_t) * (torch.exp(-h) - 1.0)
        x_next = sigma_t / sigma_s * x - coef * x0
        if 0 < i < len(self.timesteps) - 1:
            r0 = (lam_s - log_snr(self.sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (x0 - self._x0_history[-2])
            x_next = x_next - 0.5 * coef * d1
        return x_next
