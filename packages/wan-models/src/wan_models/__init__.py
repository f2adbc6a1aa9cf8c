"""Wan 2.1 networks as plain torch modules, exact to the released checkpoints."""

from .attention import attention, get_attention_backend, set_attention_backend
from .dit import WanDiT
from .dit_config import DiTConfig, MotionControllerConfig
from .motion_controller import MotionController

__all__ = [
    "DiTConfig", "MotionController", "MotionControllerConfig", "WanDiT",
    "attention", "get_attention_backend", "set_attention_backend",
]
