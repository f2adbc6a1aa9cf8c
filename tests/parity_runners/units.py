"""Parity runners for the conditioning units: what DiffSynth's pipeline hands its first DiT call
(``pipeline_unit``: image, Fun control/reference, VACE) and the camera Plücker packing.

A ``pipeline_unit`` scenario runs :meth:`WanVideoPipeline.prepare` with the case's tiny VAE (and
CLIP) and a DiT built on ``meta``: the units only read the DiT's config, so no weights are needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from parity_support import ParityCase, Runner
from wan_models import DiTConfig, WanDiT
from wan_models.clip import CLIPVisionConfig, CLIPVisionTower, visual_state_dict
from wan_models.vae import VAEConfig, WanVAE
from wan_runtime import WanVideoPipeline
from wan_runtime.images import image_to_tensor
from wan_runtime.request import GenerationRequest
from wan_runtime.units import Conditioning
from wan_runtime.units.camera import pack_camera, plucker_embedding

# DiT sizes that do not matter to the units (which read only the config's flags and in_dim).
STAND_IN_SIZES = {"dim": 32, "ffn_dim": 32, "num_heads": 2, "num_layers": 1, "text_dim": 16,
                  "text_len": 8, "freq_dim": 16}
VACE_ARGS = ("vace_video", "vace_video_mask", "vace_reference_image")
# Scenario DiT flags (DiffSynth names) the stand-in can honour; the require_* ones only as True.
KNOWN_FLAGS = {"has_image_pos_emb", "require_vae_embedding", "require_clip_embedding"}
# Recorded DiffSynth model_fn argument -> our Conditioning.shared key.
SHARED_NAMES = {"y": "y", "clip_feature": "clip_feature", "reference_latents": "reference_latents",
                "vace_context": "vace_context", "control_camera_latents_input": "camera"}


def _vae(case: ParityCase) -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(VAEConfig(**case.config["vae"]))
    vae.load_state_dict(case.weights, strict=True, assign=True)
    return vae.eval()


def _clip(case: ParityCase) -> CLIPVisionTower | None:
    if "image_encoder" not in case.spec.get("extra_weights", {}):
        return None
    config, weights = case.extra_weights("image_encoder")
    with torch.device("meta"):
        clip = CLIPVisionTower(CLIPVisionConfig.from_official(config))
    clip.load_state_dict(visual_state_dict(weights), strict=True, assign=True)
    return clip.eval()


def _stand_in_dit(scenario: dict[str, Any], latent_channels: int, clip_dim: int) -> WanDiT:
    """A meta DiT of the kind the scenario's inputs call for, with the scenario's flags."""
    flags = scenario.get("dit", {})
    unknown = set(flags) - KNOWN_FLAGS
    off = [k for k in ("require_vae_embedding", "require_clip_embedding") if flags.get(k) is False]
    if unknown or off:
        raise ValueError(f"scenario {scenario['name']}: DiT flags {sorted(unknown) + off} are not Wan 2.1 options")
    args = set(scenario["args"])
    z = latent_channels
    kind: dict[str, Any] = {"in_dim": z, "out_dim": z, "clip_dim": clip_dim}
    if args & set(VACE_ARGS):
        kind["vace_layers"] = (0,)
    elif args & {"control_video", "reference_image"}:
        kind.update(image_input=True, in_dim=3 * z, ref_conv="reference_image" in args)
    elif "input_image" in args:
        kind.update(image_input=True, in_dim=2 * z + 4, image_pos_emb=flags.get("has_image_pos_emb", False))
    with torch.device("meta"):
        return WanDiT(DiTConfig(**STAND_IN_SIZES, **kind))


def _as_pil(pixels: torch.Tensor) -> Image.Image | list[Image.Image]:
    """``[H, W, 3]`` (or ``[T, H, W, 3]``) float pixel values 0..255 -> a PIL image (or frames)."""
    array = pixels.numpy().astype(np.uint8)
    if array.ndim == 4:
        return [Image.fromarray(frame, "RGB") for frame in array]
    return Image.fromarray(array, "RGB")


def _recorded(cond: Conditioning, name: str) -> torch.Tensor:
    if name == "latents":
        return cond.latents
    if name not in SHARED_NAMES:
        raise KeyError(f"no mapping for the recorded DiT argument {name!r}")
    return cond.shared[SHARED_NAMES[name]]


@torch.no_grad()
def pipeline_unit(case: ParityCase) -> dict[str, torch.Tensor]:
    settings = case.config.get("pipeline", {})
    vae, clip = _vae(case), _clip(case)
    clip_dim = clip.config.vision_dim if clip is not None else 1280
    literal = {k: tuple(v) if isinstance(v, list) else v for k, v in case.literal_args.items()
               if k not in ("scenarios", "preprocessed")}
    out: dict[str, torch.Tensor] = {}
    for scenario in case.literal_args["scenarios"]:
        pipe = WanVideoPipeline(device=settings.get("device", "cpu"),
                                torch_dtype=getattr(torch, settings.get("torch_dtype", "float32")))
        pipe.add_model(vae)
        if clip is not None:
            pipe.add_model(clip)
        dit = _stand_in_dit(scenario, vae.config.z_dim, clip_dim)
        pipe.add_model(dit)
        context = torch.zeros(1, dit.config.text_len, dit.config.text_dim)
        images = {arg: _as_pil(case.inputs[name]) for arg, name in scenario["args"].items()}
        request = GenerationRequest(prompt="", cfg_scale=1.0, num_inference_steps=1, **literal, **images,
                                    extra={"prompt_embeds": context})
        cond = pipe.prepare(request)
        for recorded, name in scenario["outputs"].items():
            out[name] = _recorded(cond, recorded)
    for name, image_name in case.literal_args.get("preprocessed", {}).items():
        out[name] = image_to_tensor(_as_pil(case.inputs[image_name])).unsqueeze(0)
    return out


def camera_control(case: ParityCase) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, r in enumerate(case.literal_args["requests"]):
        plucker = plucker_embedding(r["direction"], r["num_frames"], r["height"], r["width"], r["speed"],
                                    r.get("origin"))
        out[f"plucker_{i}"] = plucker
        out[f"control_camera_latents_input_{i}"] = pack_camera(plucker)
    return out


RUNNERS: dict[str, Runner] = {"pipeline_unit": pipeline_unit, "camera_control": camera_control}
