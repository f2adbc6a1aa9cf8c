"""MagCache: skip the blocks while the calibrated change of the residual's magnitude stays small.

The blocks' residual (output minus input) shrinks or grows by a steady ratio from step to step,
which a calibration run measures once per model and step count (:func:`calibrate_magcache`). At
generation time the ratios of consecutive skipped steps are multiplied; their accumulated distance
from 1 estimates the error of reusing the last computed residual. Steps are skipped while that
error stays under ``threshold`` and at most ``max_skip_steps`` in a row; the first
``retention_ratio`` of the schedule always computes.

An expert pair (Wan2.2-A14B) is calibrated per expert: each expert's ratios cover the steps it
serves, and its caches start afresh at the switch (the residual of one expert says nothing of the
other's).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from .registry import REQUIRED, option_number, register_step_cache

logger = logging.getLogger(__name__)


def resample_ratios(ratios: Sequence[float], steps: int) -> list[float]:
    """Calibrated ratios for another step count (nearest calibrated step at the same schedule position)."""
    if len(ratios) == steps:  # also an expert serving no step
        return list(ratios)
    if not ratios:
        raise ValueError("mag_cache_ratios is empty; run calibrate_magcache first")
    last = len(ratios) - 1
    return [float(ratios[int(i * last / max(steps - 1, 1) + 0.5)]) for i in range(steps)]


class MagCache:
    """Skip decisions and cached residual for one CFG branch over one generation."""

    def __init__(self, num_steps: int, ratios: Sequence[float], threshold: float = 0.04,
                 max_skip_steps: int = 2, retention_ratio: float = 0.2) -> None:
        if threshold < 0:
            raise ValueError(f"mag_cache_thresh must be >= 0, got {threshold!r}")
        if max_skip_steps < 0:
            raise ValueError(f"mag_cache_max_skip_steps must be >= 0, got {max_skip_steps!r}")
        if not 0.0 <= retention_ratio <= 1.0:
            raise ValueError(f"mag_cache_retention_ratio must be in [0, 1], got {retention_ratio!r}")
        self.ratios = resample_ratios(ratios, num_steps)
        self.threshold, self.max_skip_steps = threshold, max_skip_steps
        self.retained = int(round(retention_ratio * num_steps))
        self.num_steps = num_steps
        self.step = 0
        self._reset()
        self.residual: torch.Tensor | None = None
        self.skipped: list[bool] = []

    def _reset(self) -> None:
        self.ratio, self.error, self.run_length = 1.0, 0.0, 0

    def should_skip(self) -> bool:
        """Decide for this step (called once per step, before the blocks)."""
        step, self.step = self.step, self.step + 1
        skip = False
        if self.retained <= step < self.num_steps - 1 and self.residual is not None:
            self.ratio *= self.ratios[step]
            self.error += abs(1.0 - self.ratio)
            self.run_length += 1
            skip = self.error <= self.threshold and self.run_length <= self.max_skip_steps
        if not skip:
            self._reset()
        self.skipped.append(skip)
        return skip

    def run(self, dit, inputs) -> torch.Tensor:
        """The blocks' output for ``inputs`` (a ``wan_models.DiTInputs``), computed or reused."""
        if self.should_skip():
            return inputs.tokens + self.residual
        tokens = dit.run_blocks(inputs)
        self.residual = tokens - inputs.tokens
        return tokens


def expert_ratios(ratios: Any, expert: str | None, steps: int) -> Sequence[Any]:
    """The ratios for the route ``expert`` (``None``: the pipeline's one DiT) serving ``steps`` steps: the
    list (or per-branch lists) as given for one DiT; the expert's entry of a per-expert dict, whose
    length must be its step count."""
    if isinstance(ratios, Mapping):
        if expert is None:
            raise ValueError(f"MagCache ratios given per expert ({sorted(ratios)}), but the pipeline holds one DiT; "
                             "pass the list calibrate_magcache(pipe, ...) returns for it")
        if expert not in ratios:
            raise ValueError(f"MagCache ratios have no entry for expert {expert!r} (got {sorted(ratios)}); "
                             "calibrate_magcache(pipe, ...) on the expert pair gives one per expert")
        own = ratios[expert]
        rows = own if own and isinstance(own[0], (list, tuple)) else [own]
        wrong = [len(row) for row in rows if len(row) != steps]
        if wrong:
            raise ValueError(f"MagCache ratios of expert {expert!r} hold {wrong[0]} steps, but it serves {steps} "
                             "steps of this generation; calibrate with the same num_inference_steps, sampler, "
                             "sigma_shift and switch_DiT_boundary")
        return own
    if expert is not None:
        raise ValueError("MagCache ratios given as one list (or one per CFG branch), but the pipeline holds an "
                         "expert pair; pass ratios per expert, {'dit': ..., 'dit2': ...}, as calibrate_magcache(pipe, "
                         "...) returns them for the pair (step_cache='magcache', step_cache_options={'ratios': ...})")
    return ratios


def _magcache(options: dict[str, Any], steps: int, branch: int, expert: str | None = None) -> MagCache:
    """The MagCache of one CFG branch of one route: its own row of per-branch ratios, or the one list for
    all branches; with an expert pair, from that expert's ratios."""
    ratios = options["ratios"]
    if not ratios:
        raise ValueError("step cache 'magcache' needs step_cache_options['ratios'] from "
                         "wan_runtime.caching.calibrate_magcache(pipe, ...) for this model")
    ratios = expert_ratios(ratios, expert, steps)
    per_branch = ratios if ratios and isinstance(ratios[0], (list, tuple)) else [ratios]
    max_skip = options["max_skip_steps"]
    if isinstance(max_skip, bool) or not isinstance(max_skip, int):
        raise ValueError(f"step_cache_options['max_skip_steps'] of 'magcache' must be an int, got {max_skip!r}")
    return MagCache(steps, per_branch[min(branch, len(per_branch) - 1)],
                    option_number("magcache", options, "threshold", low=0.0), max_skip,
                    option_number("magcache", options, "retention_ratio", low=0.0, high=1.0))


register_step_cache("magcache", _magcache,
                    options={"threshold": REQUIRED, "ratios": None, "max_skip_steps": 2, "retention_ratio": 0.2},
                    fields={"mag_cache_thresh": "threshold", "mag_cache_ratios": "ratios",
                            "mag_cache_max_skip_steps": "max_skip_steps",
                            "mag_cache_retention_ratio": "retention_ratio"}, experts=True)


class ResidualRecorder:
    """A cache stand-in that always computes and records each step's residual magnitude ratio."""

    def __init__(self) -> None:
        self.previous_norm: float | None = None
        self.ratios: list[float] = []
        self.skipped: list[bool] = []

    def run(self, dit, inputs) -> torch.Tensor:
        tokens = dit.run_blocks(inputs)
        norm = (tokens - inputs.tokens).float().norm(dim=-1).mean().item()
        self.ratios.append(1.0 if not self.previous_norm else norm / self.previous_norm)
        self.previous_norm = norm
        self.skipped.append(False)
        return tokens


def calibrate_magcache(pipe, progress_bar_cmd=lambda x: x,
                       **call_kwargs) -> list[list[float]] | dict[str, list[list[float]]]:
    """Run one full generation recording residual magnitude ratios: one list per CFG branch; for an
    expert pair a dict ``{"dit": ..., "dit2": ...}`` of those, each over the steps that expert serves.

    ``call_kwargs`` are the pipeline call's (prompt, sizes, steps, ...). Pass the result as
    ``mag_cache_ratios`` (one DiT) or ``step_cache_options={"ratios": ...}`` (either) to later calls
    with the same model and schedule (for one DiT other step counts are resampled).
    """
    embeds = {k: call_kwargs.pop(k) for k in ("prompt_embeds", "negative_prompt_embeds") if k in call_kwargs}
    # Ratios are measured per CFG branch, so the branches run separately whatever cfg_merge says.
    request = pipe.request({**call_kwargs, "cfg_merge": False}, embeds)  # as pipe(...) would build it
    recorders: dict[str, list[ResidualRecorder]] = {}

    def record(_pipe, _request, _cond, plan) -> None:  # a step hook: every route's caches become recorders
        for route in plan.routes:
            route.caches = recorders.setdefault(route.name, [ResidualRecorder() for _ in route.caches])

    pipe.step_hooks.append(record)
    try:
        with torch.no_grad():
            pipe.denoise(request, pipe.prepare(request), progress_bar_cmd=progress_bar_cmd)
    finally:
        pipe.step_hooks.remove(record)
    ratios = {name: [r.ratios for r in branch] for name, branch in recorders.items()}
    logger.info("MagCache calibration: %s, %d branch(es)",
                ", ".join(f"{name} {len(rows[0])} steps" for name, rows in ratios.items()), len(ratios["dit"]))
    return ratios if pipe.dit2 is not None else ratios["dit"]
