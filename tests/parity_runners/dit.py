"""Parity runners for the DiT family: official ``WanModel``/``VaceWanModel`` calls, DiffSynth's
``model_fn_wan_video`` and the speed-control motion controller."""

from __future__ import annotations

import torch

from parity_support import ParityCase
from wan_models import DiTConfig, MotionController, MotionControllerConfig, WanDiT


def build(config: DiTConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    with torch.device("meta"):
        model = WanDiT(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def official_dit(case: ParityCase) -> dict[str, torch.Tensor]:
    clip_dim = case.constants.get("clip_dim", 1280)
    model = build(DiTConfig.from_official(case.config, clip_dim=clip_dim), case.weights)
    i = case.inputs
    clip = i.get("clip_fea")
    with torch.no_grad():
        out = model(i["x"], i["t"], i["context"], clip_feature=clip, y=i.get("y"),
                    vace_context=i.get("vace_context"),
                    vace_scale=case.literal_args.get("vace_context_scale", 1.0))
    return {"out": out}


def diffsynth_model_fn(case: ParityCase) -> dict[str, torch.Tensor]:
    clip_dim = case.constants.get("clip_dim", 1280)
    config = DiTConfig.from_diffsynth(case.config, clip_dim=clip_dim,
                                      vace=case.spec.get("diffsynth_vace_config"))
    model = build(config, case.weights)
    i = case.inputs
    motion = None
    if "motion_bucket_id" in i:
        mc_config, mc_weights = case.extra_weights("motion_controller")
        controller = MotionController(MotionControllerConfig(**mc_config))
        controller.load_state_dict(mc_weights, strict=True)
        motion = controller(i["motion_bucket_id"])
    with torch.no_grad():
        out = model(i["latents"], i["timestep"], i["context"],
                    clip_feature=i.get("clip_feature") if config.image_input else None,
                    y=i.get("y") if config.image_input else None,
                    reference_latents=i.get("reference_latents"),
                    camera=i.get("control_camera_latents_input"),
                    motion_embedding=motion,
                    # DiffSynth sends only the first image's tokens to the image attention.
                    image_attention_tokens=257)
    return {"out": out}


def motion_controller(case: ParityCase) -> dict[str, torch.Tensor]:
    controller = MotionController(MotionControllerConfig(**case.config))
    controller.load_state_dict(case.weights, strict=True)
    with torch.no_grad():
        return {"out": controller(case.inputs["motion_bucket_id"])}


RUNNERS = {
    "official_dit": official_dit,
    "diffsynth_model_fn": diffsynth_model_fn,
    "motion_controller": motion_controller,
}
