"""Wan 2.1 inference on top of the ``wan_models`` networks: pipeline, samplers, caching.

``from wan_runtime import WanVideoPipeline, ModelConfig, save_video`` mirrors the seed's API.
"""

from wan_runtime.model_config import ModelConfig, ModelFilesMissing
from wan_runtime.pipeline import WanVideoPipeline
from wan_runtime.request import GenerationRequest
from wan_runtime.schedulers import (
    FlowDPMPPScheduler,
    FlowEulerScheduler,
    FlowUniPCScheduler,
    Scheduler,
    make_scheduler,
)
from wan_runtime.video_io import load_image, load_video, save_video

__all__ = [
    "FlowDPMPPScheduler",
    "FlowEulerScheduler",
    "FlowUniPCScheduler",
    "GenerationRequest",
    "ModelConfig",
    "ModelFilesMissing",
    "Scheduler",
    "WanVideoPipeline",
    "load_image",
    "load_video",
    "make_scheduler",
    "save_video",
]
