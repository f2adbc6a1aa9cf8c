"""Parity runners for the Wan2.2-VAE: official ``wan/modules/vae2_2.py::WanVAE_.encode/decode``."""

from __future__ import annotations

import torch

from parity_support import ParityCase
from wan_models.vae22 import VAE22Config, WanVAE22


def _build(case: ParityCase) -> WanVAE22:
    """The case's VAE on meta with the case's 48-channel latent statistics, loaded strictly."""
    stats = {"latents_mean": case.inputs["latents_mean"].tolist(), "latents_std": case.inputs["latents_std"].tolist()}
    with torch.device("meta"):
        model = WanVAE22(VAE22Config(**case.config, **stats))
    model.load_state_dict(case.weights, strict=True, assign=True)
    return model.eval()


def vae_encode(case: ParityCase) -> dict[str, torch.Tensor]:
    model, video = _build(case), case.inputs["video"]
    with torch.no_grad():
        return {"latents": model.encode(video), "latents_raw": model.encode(video, normalize=False)}


def vae_decode(case: ParityCase) -> dict[str, torch.Tensor]:
    model = _build(case)
    with torch.no_grad():
        video = model.decode(case.inputs["latents"], clamp=False)
    return {"video": video, "video_clamped": video.clamp(-1.0, 1.0)}


RUNNERS = {"wan22_vae_encode": vae_encode, "wan22_vae_decode": vae_decode}
