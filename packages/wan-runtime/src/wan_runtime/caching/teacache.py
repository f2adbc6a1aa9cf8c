"""TeaCache: reuse the blocks' residual on steps where the time modulation barely changed.

Per CFG branch, the relative L1 change of the block modulation ``e0`` between steps is rescaled
by a per-model polynomial and accumulated; while the sum stays under the threshold the blocks are
skipped and the last computed residual (block output minus block input) is added instead. The
first and last steps always compute.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .registry import REQUIRED, option_number, register_step_cache

logger = logging.getLogger(__name__)

# Rescaling polynomials (highest power first), calibrated per released model by the TeaCache authors.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "Wan2.1-T2V-1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "Wan2.1-T2V-14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "Wan2.1-I2V-14B-480P": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "Wan2.1-I2V-14B-720P": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}


class TeaCache:
    """Skip decisions and cached residual for one CFG branch over one generation."""

    def __init__(self, num_steps: int, threshold: float, model_id: str) -> None:
        if model_id not in TEACACHE_COEFFICIENTS:
            raise ValueError(f"no TeaCache coefficients for model id {model_id!r}; "
                             f"choose one of {', '.join(TEACACHE_COEFFICIENTS)}")
        if threshold < 0:
            raise ValueError(f"tea_cache_l1_thresh must be >= 0, got {threshold!r}")
        self.num_steps, self.threshold = num_steps, threshold
        self.coefficients = TEACACHE_COEFFICIENTS[model_id]
        self.step = 0
        self.accumulated = 0.0
        self.previous_e0: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.skipped: list[bool] = []

    def _rescale(self, x: float) -> float:
        value = 0.0
        for c in self.coefficients:
            value = value * x + c
        return value

    def should_skip(self, e0: torch.Tensor) -> bool:
        """Decide for this step from the modulation ``e0`` (called once per step, before the blocks)."""
        if self.step in (0, self.num_steps - 1) or self.previous_e0 is None or self.residual is None:
            skip, self.accumulated = False, 0.0
        else:
            change = ((e0 - self.previous_e0).abs().mean() / self.previous_e0.abs().mean()).item()
            self.accumulated += self._rescale(change)
            skip = self.accumulated < self.threshold
            if not skip:
                self.accumulated = 0.0
        self.previous_e0 = e0
        self.step += 1
        self.skipped.append(skip)
        return skip

    def run(self, dit, inputs) -> torch.Tensor:
        """The blocks' output for ``inputs`` (a ``wan_models.DiTInputs``), computed or reused."""
        if self.should_skip(inputs.e0):
            return inputs.tokens + self.residual
        tokens = dit.run_blocks(inputs)
        self.residual = tokens - inputs.tokens
        return tokens


def _teacache(options: dict[str, Any], steps: int, branch: int) -> TeaCache:
    """One TeaCache per CFG branch (the modulation is the same for both, the residuals are not)."""
    if not isinstance(options["model_id"], str):
        raise ValueError(f"step_cache_options['model_id'] of 'teacache' must be a str, got {options['model_id']!r}")
    return TeaCache(steps, option_number("teacache", options, "threshold", low=0.0), options["model_id"])


register_step_cache("teacache", _teacache, options={"threshold": REQUIRED, "model_id": ""},
                    fields={"tea_cache_l1_thresh": "threshold", "tea_cache_model_id": "model_id"})
