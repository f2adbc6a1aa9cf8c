"""The DiT call of one denoising step: optional step caching and temporal sliding windows."""

from __future__ import annotations

from typing import Any

import torch

from .caching import StepCache

# DiT inputs that run along the latent frame axis and are cut per sliding window.
FRAME_INPUTS = ("y", "vace_context", "camera")


def predict(dit, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, Any],
            cache: StepCache | None = None) -> torch.Tensor:
    """The DiT's velocity for ``latents``, reusing blocks through ``cache`` when it says so."""
    if cache is None:
        return dit(latents, timestep, **inputs)
    prepared = dit.prepare(latents, timestep, **inputs)
    return dit.finish(cache.run(dit, prepared), prepared)


def _ramp(length: int, border: int, open_start: bool, open_end: bool) -> torch.Tensor:
    """Blend weights along time: linear ramps of ``border`` frames on the inner edges of a window."""
    weight = torch.ones(length)
    if border <= 0:
        return weight
    ramp = torch.arange(1, border + 1, dtype=torch.float32) / border
    if not open_start:
        weight[:border] = ramp[:length]
    if not open_end:
        weight[-border:] = ramp.flip(0)[-length:]
    return weight


def predict_windows(dit, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict[str, Any],
                    size: int, stride: int) -> torch.Tensor:
    """Run the DiT over overlapping windows of ``size`` latent frames and blend them linearly.

    Windows start every ``stride`` frames; the last one is clipped at the end, and a window that
    would only repeat frames the previous one already covered is skipped. A per-token timestep
    ``[1, L]`` (frame-major tokens) is cut to each window's frames.
    """
    frames = latents.shape[2]
    per_token = timestep.dim() == 2
    if per_token and timestep.shape[1] % frames:
        raise ValueError(f"per-token timestep of {timestep.shape[1]} tokens does not split into the "
                         f"{frames} latent frames of the sliding windows")
    frame_tokens = timestep.shape[-1] // frames
    value = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
    weight = torch.zeros(1, 1, frames, 1, 1, device=latents.device)
    for start in range(0, frames, stride):
        if start > 0 and start - stride + size >= frames:
            break
        end = min(start + size, frames)
        window = {k: (v[:, :, start:end] if k in FRAME_INPUTS and isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        window_t = timestep[:, start * frame_tokens:end * frame_tokens] if per_token else timestep
        out = dit(latents[:, :, start:end], window_t, **window).float()
        ramp = _ramp(end - start, size - stride, start == 0, end == frames).to(latents.device)
        value[:, :, start:end] += out * ramp.view(1, 1, -1, 1, 1)
        weight[:, :, start:end] += ramp.view(1, 1, -1, 1, 1)
    return value / weight
