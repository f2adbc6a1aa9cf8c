"""Parity runners for the Wan-VAE: official ``WanVAE_.encode/decode`` and DiffSynth's tiled
``WanVideoVAE.encode/decode`` (which also records the untiled result)."""

from __future__ import annotations

import torch

from parity_support import ParityCase
from wan_models.vae import VAEConfig, WanVAE


def build(case: ParityCase, module: type[WanVAE] = WanVAE, config: type = VAEConfig) -> WanVAE:
    """The case's VAE on meta, loaded strictly; latent stats from the inputs where the case has them."""
    stats = {}
    if "latents_mean" in case.inputs:
        stats = {"latents_mean": case.inputs["latents_mean"].tolist(),
                 "latents_std": case.inputs["latents_std"].tolist()}
    with torch.device("meta"):
        model = module(config(**case.config, **stats))
    model.load_state_dict(case.weights, strict=True, assign=True)
    return model.eval()


def encode(model: WanVAE, case: ParityCase) -> dict[str, torch.Tensor]:
    video = case.inputs["video"]
    with torch.no_grad():
        return {"latents": model.encode(video), "latents_raw": model.encode(video, normalize=False)}


def decode(model: WanVAE, case: ParityCase) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        video = model.decode(case.inputs["latents"], clamp=False)
    return {"video": video, "video_clamped": video.clamp(-1.0, 1.0)}


def vae_encode(case: ParityCase) -> dict[str, torch.Tensor]:
    return encode(build(case), case)


def vae_decode(case: ParityCase) -> dict[str, torch.Tensor]:
    return decode(build(case), case)


def vae_tiled(case: ParityCase) -> dict[str, torch.Tensor]:
    model = build(case)
    tiling = {"tile_size": case.literal_args["tile_size"], "tile_stride": case.literal_args["tile_stride"]}
    with torch.no_grad():
        if "video" in case.inputs:
            video = case.inputs["video"]
            return {"latents": model.encode(video, tiled=True, **tiling), "latents_untiled": model.encode(video)}
        latents = case.inputs["latents"]
        return {"video": model.decode(latents, tiled=True, **tiling), "video_untiled": model.decode(latents)}


RUNNERS = {"vae_encode": vae_encode, "vae_decode": vae_decode, "vae_tiled": vae_tiled}
