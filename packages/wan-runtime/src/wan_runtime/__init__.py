"""Wan 2.1 inference runtime built on the ``wan_models`` networks.

So far this package provides the samplers; see :mod:`wan_runtime.schedulers`.
"""

from wan_runtime.schedulers import (
    FlowDPMPPScheduler,
    FlowEulerScheduler,
    FlowUniPCScheduler,
    Scheduler,
    make_scheduler,
)

__all__ = [
    "FlowDPMPPScheduler",
    "FlowEulerScheduler",
    "FlowUniPCScheduler",
    "Scheduler",
    "make_scheduler",
]
