"""TeaCache: reuse the blocks' residual on steps where the time modulation barely changed.

Per CFG branch, the relative L1 change of the block modulation ``e0`` between steps is rescaled
by a per-model polynomial and accumulated; while the sum stays under the threshold the blocks are
skipped and the last computed residual (block output minus block input) is added instead. The
first and last steps always compute.

Coefficients are fitted per released model, so they apply only to a DiT of that model's family and
(for Wan 2.2) variant: Wan 2.1 coefficients are refused on a Wan 2.2 DiT. For Wan 2.2 only TI2V-5B
has published coefficients; the A14B experts have none (use First Block Cache or MagCache).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from wan_models import MODELS

from .registry import REQUIRED, option_number, register_step_cache

logger = logging.getLogger(__name__)

# Rescaling polynomials (highest power first), calibrated per released model by the TeaCache authors.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "Wan2.1-T2V-1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "Wan2.1-T2V-14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "Wan2.1-I2V-14B-480P": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "Wan2.1-I2V-14B-720P": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    # LightX2V, configs/caching/teacache/wan_ti2v_tea_720p.json (ModelTC/LightX2V): its "use_ret_steps":
    # false set, fitted on the time embedding e (not e0); their threshold there is 0.26.
    "Wan2.2-TI2V-5B": (1.57472669e05, -1.15702395e05, 3.10761669e04, -3.83116651e03, 2.21608777e02,
                       -4.81179567e00),
}
# Which modulation the coefficients were fitted on: "e" (the time embedding) where not "e0" (the blocks').
TEACACHE_INPUTS: dict[str, str] = {"Wan2.2-TI2V-5B": "e"}
NO_COEFFICIENTS_HINT = ("use step_cache='first_block' (no calibration) or step_cache='magcache' with ratios from "
                        "wan_runtime.caching.calibrate_magcache(pipe, ...)")


def check_model_id(model_id: str) -> None:
    """``model_id`` must have coefficients; a Wan 2.2 id without them names the alternatives."""
    if model_id in TEACACHE_COEFFICIENTS:
        return
    spec = MODELS.get(model_id)
    if spec is not None and spec.family == "wan2.2":
        raise ValueError(f"no published TeaCache coefficients for {model_id!r} (for Wan 2.2 only "
                         f"{', '.join(k for k in TEACACHE_COEFFICIENTS if k.startswith('Wan2.2'))}); "
                         f"{NO_COEFFICIENTS_HINT}")
    raise ValueError(f"no TeaCache coefficients for model id {model_id!r}; "
                     f"choose one of {', '.join(TEACACHE_COEFFICIENTS)}")


def check_dit_fits(model_id: str, dit: Any) -> None:
    """The DiT must be of the family (and, for Wan 2.2, the variant) the coefficients were fitted on, so
    that Wan 2.1 coefficients never apply to a Wan 2.2 DiT; a DiT without a config is not checked."""
    config = getattr(dit, "config", None) or getattr(getattr(dit, "dit", None), "config", None)  # or SP-wrapped
    expected = MODELS[model_id].config
    if config is None or (config.family == expected.family
                          and (expected.family == "wan2.1" or config.variant == expected.variant)):
        return
    raise ValueError(f"TeaCache coefficients of {model_id!r} were fitted on its {expected.family} {expected.variant} "
                     f"DiT, but this DiT is {config.family} {config.variant}; they do not transfer. "
                     + ("Wan 2.2 TI2V-5B has its own (tea_cache_model_id='Wan2.2-TI2V-5B'); "
                        if config.variant == "wan2.2-ti2v" else "") + NO_COEFFICIENTS_HINT)


class TeaCache:
    """Skip decisions and cached residual for one CFG branch over one generation."""

    def __init__(self, num_steps: int, threshold: float, model_id: str) -> None:
        check_model_id(model_id)
        if threshold < 0:
            raise ValueError(f"tea_cache_l1_thresh must be >= 0, got {threshold!r}")
        self.num_steps, self.threshold, self.model_id = num_steps, threshold, model_id
        self.coefficients = TEACACHE_COEFFICIENTS[model_id]
        self.input = TEACACHE_INPUTS.get(model_id, "e0")
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
        """Decide for this step from the modulation the coefficients were fitted on (``e0``, or ``e`` where
        :data:`TEACACHE_INPUTS` says so; called once per step, before the blocks)."""
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
        if self.step == 0:
            check_dit_fits(self.model_id, dit)
        if self.should_skip(inputs.e if self.input == "e" else inputs.e0):
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
