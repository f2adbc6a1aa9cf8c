"""Wan 2.1 inference on top of the ``wan_models`` networks: pipeline, samplers, caching.

``from wan_runtime import WanVideoPipeline, ModelConfig, save_video`` mirrors the seed's API.
"""

from wan_runtime.pipeline import WanVideoPipeline
from wan_runtime.request import GenerationRequest
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
    "GenerationRequest",
    "Scheduler",
    "WanVideoPipeline",
    "make_scheduler",
]
