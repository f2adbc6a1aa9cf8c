"""One denoising step, composed of parts that a model's declaration (or the caller) chooses.

Per generation the pipeline builds a :class:`StepPlan` by running its ``step_hooks`` in order; each
hook fills in one part. The loop then does, for every scheduler timestep ``t``::

    route = plan.route(t)           # which DiT serves t, with which guidance scale and step caches
    timestep = plan.timestep(t)     # what that DiT gets as t: one value, or one per token
    velocity = guided DiT call      # CFG, batched or not (the pipeline's _velocity)
    latents = scheduler.step(...)
    for fix in plan.fixups:         # put back what the model keeps fixed (TI2V: the image's frame)
        latents = fix(latents)

Replacing a part is replacing a hook in ``pipe.step_hooks`` (or setting the part in a hook added
after the defaults); the loop itself never changes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .caching import StepCache, make_step_caches
from .experts import HIGH, ExpertSwitch

if TYPE_CHECKING:
    from .pipeline import WanVideoPipeline
    from .request import GenerationRequest
    from .units import Conditioning

logger = logging.getLogger(__name__)

Fixup = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_BOUNDARY = 0.875  # DiffSynth's switch_DiT_boundary default (T2V-A14B's released value)


@dataclass
class Route:
    """The DiT that serves a step (``name`` is its pipeline slot), its guidance scale and step caches
    (one per CFG branch, ``None`` for none)."""

    name: str
    dit: Any
    cfg_scale: float
    caches: list[StepCache | None]


@dataclass
class StepPlan:
    """The parts of every step of one generation; see the module docstring."""

    timestep: Callable[[torch.Tensor], torch.Tensor] | None = None
    route: Callable[[torch.Tensor], Route] | None = None
    fixups: list[Fixup] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)  # every route the plan can take, for reports


StepHook = Callable[["WanVideoPipeline", "GenerationRequest", "Conditioning", StepPlan], None]


def timestep_part(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning, plan: StepPlan) -> None:
    """The scheduler's ``t`` in the pipeline dtype (the reference casts it too, so bf16 runs see rounded
    timesteps); a DiT that declares per-token timesteps gets ``[1, L]``, scaled per token by
    ``cond.token_timestep_scale`` where a unit set one (TI2V: 0 on the image's tokens)."""
    dtype, device = pipe.torch_dtype, pipe.device
    if not pipe.dit.config.per_token_timesteps:
        plan.timestep = lambda t: t.reshape(1).to(dtype=dtype, device=device)
        return
    latents = cond.latents
    patch = pipe.dit.config.patch_size
    tokens = math.prod(n // p for n, p in zip(latents.shape[2:], patch))
    scale = cond.token_timestep_scale
    if scale is not None and tuple(scale.shape) != (1, tokens):
        raise ValueError(f"token_timestep_scale has shape {tuple(scale.shape)}; the DiT sees (1, {tokens}) tokens")

    if scale is not None:
        scale = scale.to(device=device, dtype=torch.float32)  # once, not every step

    def per_token(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(1, 1).to(dtype=dtype, device=device).expand(1, tokens)
        return t if scale is None else (scale * t.float()).to(dtype)

    plan.timestep = per_token


def expert_part(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning, plan: StepPlan) -> None:
    """One DiT: it serves every step. Two (``pipe.dit2`` loaded): the high-noise expert ``pipe.dit``
    while ``t >= switch_DiT_boundary * 1000``, then the low-noise ``pipe.dit2``; each with its own
    guidance (``cfg_scale``, ``cfg_scale_2``) and its own step caches over the steps it serves."""
    timesteps = pipe.scheduler.timesteps
    branches = 2 if request.uses_cfg else 1
    if pipe.dit2 is None:
        only = Route("dit", pipe.dit, request.cfg_scale, make_step_caches(request, len(timesteps), branches))
        plan.route, plan.routes = (lambda t: only), [only]
        return
    low_cfg = request.cfg_scale if request.cfg_scale_2 is None else request.cfg_scale_2
    boundary = DEFAULT_BOUNDARY if request.switch_DiT_boundary is None else request.switch_DiT_boundary
    switch = ExpertSwitch(boundary, (low_cfg, request.cfg_scale))
    high_steps = sum(switch.expert(t) == HIGH for t in timesteps)
    high = Route("dit", pipe.dit, request.cfg_scale, make_step_caches(request, high_steps, branches, expert="dit"))
    low = Route("dit2", pipe.dit2, low_cfg,
                make_step_caches(request, len(timesteps) - high_steps, branches, expert="dit2"))
    logger.info("experts: high-noise for %d steps (t >= %.0f), low-noise for %d", high_steps,
                switch.boundary * switch.num_train_timesteps, len(timesteps) - high_steps)
    plan.route, plan.routes = (lambda t: high if switch.expert(t) == HIGH else low), [high, low]


def fixup_part(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning, plan: StepPlan) -> None:
    """The latent fix-ups units asked for (``cond.step_fixups``), after every solver step."""
    plan.fixups.extend(cond.step_fixups)


DEFAULT_STEP_HOOKS: tuple[StepHook, ...] = (timestep_part, expert_part, fixup_part)


def plan_steps(pipe: WanVideoPipeline, request: GenerationRequest, cond: Conditioning) -> StepPlan:
    """Run ``pipe.step_hooks`` into a :class:`StepPlan`; every part must be set by the end."""
    plan = StepPlan()
    for hook in pipe.step_hooks:
        hook(pipe, request, cond, plan)
    missing = [name for name in ("timestep", "route") if getattr(plan, name) is None]
    if missing:
        raise ValueError(f"the step hooks set no {' and no '.join(missing)} part; keep timestep_part and "
                         "expert_part (or hooks replacing them) in pipe.step_hooks")
    return plan
