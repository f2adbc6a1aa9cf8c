"""Parity runner for whole denoising loops (DiffSynth ``WanVideoPipeline.__call__``): seed to
noise, schedule, CFG steps (optionally TeaCache) and the latents handed to the VAE."""

from __future__ import annotations

import torch

from parity_support import ParityCase
from wan_models import DiTConfig, WanDiT
from wan_runtime import WanVideoPipeline
from wan_runtime.request import GenerationRequest


def pipeline(case: ParityCase) -> dict[str, torch.Tensor]:
    config = DiTConfig.from_diffsynth(case.config["dit"], clip_dim=case.constants.get("clip_dim", 1280))
    with torch.device("meta"):
        dit = WanDiT(config)
    dit.load_state_dict(case.weights, strict=True, assign=True)
    settings = case.config.get("pipeline", {})
    pipe = WanVideoPipeline(device=settings.get("device", "cpu"),
                            torch_dtype=getattr(torch, settings.get("torch_dtype", "float32")))
    pipe.add_model(dit.eval())
    i = case.inputs
    request = GenerationRequest(**case.literal_args, extra={"prompt_embeds": i["context_posi"],
                                                            "negative_prompt_embeds": i["context_nega"]})
    steps: list[torch.Tensor] = []
    with torch.no_grad():
        cond = pipe.prepare(request)
        cond.shared.update({k: i[k] for k in ("y", "clip_feature") if k in i})
        noise = cond.noise.clone()
        latents = pipe.denoise(request, cond, progress_bar_cmd=lambda x: x,
                               step_callback=lambda step, t, lat: steps.append(lat.clone()))
    out = {"noise": noise, "latents": latents, "latents_per_step": torch.stack(steps),
           "timesteps": pipe.scheduler.timesteps, "sigmas": pipe.scheduler.sigmas[:len(pipe.scheduler.timesteps)]}
    if request.tea_cache_l1_thresh is not None:
        out["skipped_posi"], out["skipped_nega"] = (torch.tensor(s, dtype=torch.int64) for s in pipe.step_cache_skips)
    return out


RUNNERS = {"pipeline": pipeline}
