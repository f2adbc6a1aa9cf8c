"""UniPC (order 2, B(h) = expm1(-h) "bh2", x0 prediction): the official Wan 2.1 default sampler.

Behaves as ``FlowUniPCMultistepScheduler`` the way ``wan/text2video.py`` builds it: the schedule
starts at ``1 - 1/1000`` (as float32) before the shift, each step first corrects the incoming
sample with the new model evaluation (UniC) and then predicts the next one (UniP); the first and
the last predictor steps are first order, and the last step returns the x0 prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from wan_runtime.schedulers.base import log_snr
from wan_runtime.schedulers.multistep import FlowMultistepSolver


class FlowUniPCScheduler(FlowMultistepSolver):
    """Multistep predictor-corrector sampler (Zhao et al. 2023) for flow-matching models."""

    name = "unipc"
    order = 2

    def _unshifted_sigmas(self, steps: int) -> np.ndarray:
        # The reference derives sigma_max from a float32 training table: float32(1 - 1/T).
        sigma_max = float(np.float32(1.0 - 1.0 / self.num_train_timesteps))
        return np.linspace(sigma_max, 0.0, steps + 1)[:-1]

    def _reset(self) -> None:
        super()._reset()
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def _update(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Correct ``x`` with the new ``x0`` (from the 2nd step on), then predict with order
        ``min(2, i + 1, steps left)``; the corrected sample and that order feed the next correction."""
        if i > 0:
            x = self._correct(i, x0)
        self._x0_history = (self._x0_history + [x0])[-self.order:]
        order = min(self.order, i + 1, len(self.timesteps) - i)
        self._last_sample, self._last_order = x, order
        return self._predict(i, x, order)

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP from sigma_i to sigma_(i+1); order 2 uses the fixed weight 0.5 on the difference term.

        At sigma_(i+1) = 0, lambda is +inf and expm1(-h) = -1, so the step returns ``x0_i`` exactly.
        """
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lam_s = log_snr(sigma_s)
        h = log_snr(sigma_t) - lam_s
        phi = torch.expm1(-h)
        m0 = self._x0_history[-1]
        x_next = sigma_t / sigma_s * x - alpha_t * phi * m0
        if order == 2:
            r = (log_snr(self.sigmas[i - 1]) - lam_s) / h
            d1 = (self._x0_history[-2] - m0) / r
            x_next = x_next - alpha_t * phi * (0.5 * d1)
        return x_next

    def _correct(self, i: int, x0: torch.Tensor) -> torch.Tensor:
        """UniC: redo the previous step from the previous sample, now also using ``x0`` (the model's
        prediction at sigma_i), with the order that step's predictor had."""
        sigma_t, sigma_s = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lam_s = log_snr(sigma_s)
        h = log_snr(sigma_t) - lam_s
        hh = -h
        phi = torch.expm1(hh)
        m0 = self._x0_history[-1]
        d1_t = x0 - m0
        if self._last_order == 1:
            correction = 0.5 * d1_t
        else:
            r = (log_snr(self.sigmas[i - 2]) - lam_s) / h
            d1 = (self._x0_history[-2] - m0) / r
            rho = self._corrector_weights(r, hh, phi)
            correction = rho[0] * d1 + rho[1] * d1_t
        x_base = sigma_t / sigma_s * self._last_sample - alpha_t * phi * m0
        return x_base - alpha_t * phi * correction

    @staticmethod
    def _corrector_weights(r: torch.Tensor, hh: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Order-2 UniC weights: solve ``[[1, 1], [r, 1]] rho = b`` with
        ``b_k = k! * phi_k(hh) / B(h)``, ``phi_1 = expm1(hh)/hh - 1``, ``phi_2 = phi_1/hh - 1/2``."""
        phi_1 = phi / hh - 1
        phi_2 = phi_1 / hh - 0.5
        b = torch.stack([phi_1 * 1 / phi, phi_2 * 2 / phi])
        one = torch.ones_like(r)
        lhs = torch.stack([torch.stack([one, one]), torch.stack([r, one])])
        return torch.linalg.solve(lhs, b)
