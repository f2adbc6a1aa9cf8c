"""Speed control: the motion bucket id through the motion controller, an offset of the DiT's modulation."""

from __future__ import annotations

import torch

from . import Conditioning


def motion_bucket(pipe, request, cond: Conditioning) -> None:
    if request.motion_bucket_id is None:
        return
    if pipe.motion_controller is None:
        raise ValueError("motion_bucket_id needs the speed-control motion controller "
                         "(DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1, model.safetensors) to be loaded")
    bucket = torch.tensor([request.motion_bucket_id], dtype=pipe.torch_dtype, device=pipe.device)
    cond.shared["motion_embedding"] = pipe.motion_controller(bucket)
