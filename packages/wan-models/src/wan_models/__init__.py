"""Wan 2.1 and 2.2 networks as plain torch modules, exact to the released checkpoints.

``load_model(path)`` reads any released network file (DiT, Wan 2.1 or 2.2 VAE, umT5, CLIP, motion
controller), detects what it holds from its keys and shapes (and, for a DiT's family and expert
role, from the files around it: :mod:`wan_models.identity`), builds it on ``meta`` and assigns the
weights.
"""

from . import loading
from .attention import get_attention_backend, set_attention_backend
from .configs import MODELS, ModelSpec, get_model_spec
from .detect import detect_config, detect_network
from .dit import DiTInputs, WanDiT
from .dit_config import DiTConfig, MotionControllerConfig
from .formats import convert, detect_format
from .loading import CheckpointError, NonFiniteWeights, load_model, read_state_dict
from .motion_controller import MotionController

__all__ = [
    "MODELS", "CheckpointError", "DiTConfig", "DiTInputs", "ModelSpec", "MotionController", "MotionControllerConfig",
    "NonFiniteWeights",
    "WanDiT", "detect_config", "detect_network", "get_attention_backend", "get_model_spec",
    "load_model", "loading", "read_state_dict", "set_attention_backend",
    "convert", "detect_format",
]
