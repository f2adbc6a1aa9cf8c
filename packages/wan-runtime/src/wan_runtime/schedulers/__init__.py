"""Samplers for Wan 2.1 flow-matching models, behind one interface (:class:`Scheduler`).

``make_scheduler("euler" | "unipc" | "dpmpp")`` picks one: ``euler`` is DiffSynth-Studio's
flow-match scheduler (also used for training), ``unipc`` and ``dpmpp`` are the official Wan
solvers (``unipc`` is the official default).
"""

from __future__ import annotations

from typing import Any

from wan_runtime.schedulers.base import Scheduler
from wan_runtime.schedulers.dpmpp import FlowDPMPPScheduler
from wan_runtime.schedulers.flow_euler import FlowEulerScheduler
from wan_runtime.schedulers.unipc import FlowUniPCScheduler

SCHEDULERS: dict[str, type] = {
    "euler": FlowEulerScheduler,
    "unipc": FlowUniPCScheduler,
    "dpmpp": FlowDPMPPScheduler,
}


def make_scheduler(name: str, **kwargs: Any) -> Scheduler:
    """A new scheduler by sampler name; ``kwargs`` go to its constructor
    (``shift``, ``num_train_timesteps``)."""
    try:
        cls = SCHEDULERS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(k) for k in SCHEDULERS)
        raise ValueError(f"unknown sampler {name!r}; expected one of {allowed}") from None
    return cls(**kwargs)


__all__ = [
    "SCHEDULERS",
    "FlowDPMPPScheduler",
    "FlowEulerScheduler",
    "FlowUniPCScheduler",
    "Scheduler",
    "make_scheduler",
]
