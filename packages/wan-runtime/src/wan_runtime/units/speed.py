"""Speed control: the motion bucket id through the motion controller, an offset of the DiT's modulation."""

from __future__ import annotations

import torch

from . import Conditioning


def motion_bucket(pipe, request, cond: Conditioning) -> None:
    """``motion_embedding`` from ``motion_bucket_id`` for a Wan 2.1 DiT of the motion controller's width."""
    if request.motion_bucket_id is None:
        return
    config = pipe.dit.config
    if config.family != "wan2.1":
        raise ValueError(f"motion_bucket_id (speed control) needs a Wan 2.1 DiT with the speed-control motion "
                         f"controller (trained for Wan2.1-T2V-1.3B); the loaded {config.variant} DiT cannot take it")
    if pipe.motion_controller is None:
        raise ValueError("motion_bucket_id needs the speed-control motion controller "
                         "(DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1, model.safetensors) to be loaded")
    if pipe.motion_controller.config.dim != config.dim:
        raise ValueError(f"motion_bucket_id: the motion controller is {pipe.motion_controller.config.dim} wide, the "
                         f"loaded {config.variant} DiT {config.dim}; it was trained for Wan2.1-T2V-1.3B (1536)")
    bucket = torch.tensor([request.motion_bucket_id], dtype=pipe.torch_dtype, device=pipe.device)
    cond.shared["motion_embedding"] = pipe.motion_controller(bucket)
