"""Parity runners for the samplers (``wan_runtime.schedulers``); calling conventions in the fixture README."""

from __future__ import annotations

from typing import Any, Callable

import torch
from parity_support import ParityCase, Runner

from wan_runtime.schedulers import FlowDPMPPScheduler, FlowEulerScheduler, FlowUniPCScheduler
from wan_runtime.schedulers.multistep import FlowMultistepSolver


def _euler(case: ParityCase) -> FlowEulerScheduler:
    """The scheduler as WanVideoPipeline builds it (sigma_min 0 and extra_one_step are built in)."""
    cfg = case.config
    assert cfg.get("sigma_min", 0.0) == 0.0 and cfg.get("sigma_max", 1.0) == 1.0, cfg
    assert cfg.get("extra_one_step", True), cfg
    assert not cfg.get("inverse_timesteps") and not cfg.get("reverse_sigmas"), cfg
    return FlowEulerScheduler(shift=cfg["shift"], num_train_timesteps=cfg["num_train_timesteps"])


def run_timesteps(case: ParityCase) -> dict[str, torch.Tensor]:
    sched = _euler(case)
    out: dict[str, torch.Tensor] = {}
    for i, (steps, shift, strength) in enumerate(case.literal_args["settings"]):
        sched.set_timesteps(steps, denoising_strength=strength, shift=shift)
        out[f"sigmas_{i}"] = sched.sigmas[:-1]  # DiffSynth keeps no terminal 0
        out[f"timesteps_{i}"] = sched.timesteps
    return out


def run_step(case: ParityCase) -> dict[str, torch.Tensor]:
    sched = _euler(case)
    steps, shift, strength = case.literal_args["setting"]
    sched.set_timesteps(steps, denoising_strength=strength, shift=shift)
    x, v, noise = case.inputs["sample"], case.inputs["model_output"], case.inputs["noise"]
    out: dict[str, torch.Tensor] = {}
    for k in case.literal_args["step_indices"]:
        t = sched.timesteps[k]
        out[f"step_{k}"] = sched.step(v, t, x)
        out[f"add_noise_{k}"] = sched.add_noise(x, noise, t)
    out["training_target"] = sched.training_target(x, noise, sched.timesteps[0])
    return out


def run_training(case: ParityCase) -> dict[str, torch.Tensor]:
    sched = _euler(case)
    sched.set_timesteps(case.literal_args["num_inference_steps"], training=True)
    queries = case.inputs["query_timesteps"]
    return {
        "sigmas": sched.sigmas[:-1],
        "timesteps": sched.timesteps,
        "linear_timesteps_weights": sched.training_weights,
        "training_weight_at_query": torch.stack([sched.training_weight(t) for t in queries]),
    }


def _check_unipc(cfg: dict[str, Any]) -> None:
    assert cfg["predict_x0"] and cfg["solver_type"] == "bh2" and not cfg["disable_corrector"], cfg


def _check_dpmpp(cfg: dict[str, Any]) -> None:
    assert (cfg["algorithm_type"], cfg["solver_type"]) == ("dpmsolver++", "midpoint"), cfg
    assert not cfg["euler_at_final"] and not cfg.get("invert_sigmas"), cfg


def _official_runner(cls: type[FlowMultistepSolver], check: Callable[[dict[str, Any]], None]) -> Runner:
    """Run the official sampling loop with the stand-in prediction ``a * x + b * (int(t) / 1000)``."""

    def run(case: ParityCase) -> dict[str, torch.Tensor]:
        cfg = case.config
        # Only the configuration the official code builds is implemented; refuse anything else.
        assert (cfg["solver_order"], cfg["prediction_type"], cfg["shift"]) == (2, "flow_prediction", 1), cfg
        assert not cfg["use_dynamic_shifting"] and not cfg["thresholding"], cfg
        assert cfg["lower_order_final"] and cfg["final_sigmas_type"] == "zero", cfg
        check(cfg)
        a, b, x_init = case.inputs["a"], case.inputs["b"], case.inputs["sample"]
        out: dict[str, torch.Tensor] = {}
        for i, (steps, shift) in enumerate(case.literal_args["settings"]):
            sched = cls(shift=shift, num_train_timesteps=cfg["num_train_timesteps"])
            sched.set_timesteps(steps)
            x, trajectory = x_init, []
            for t in sched.timesteps:
                x = sched.step(a * x + b * (int(t) / 1000.0), t, x)
                trajectory.append(x)
            out[f"timesteps_{i}"] = sched.timesteps
            out[f"sigmas_{i}"] = sched.sigmas
            out[f"samples_{i}"] = torch.stack(trajectory)
            out[f"final_{i}"] = x
        return out

    return run


RUNNERS: dict[str, Runner] = {
    "scheduler_timesteps": run_timesteps,
    "scheduler_step": run_step,
    "scheduler_training": run_training,
    "scheduler_unipc": _official_runner(FlowUniPCScheduler, _check_unipc),
    "scheduler_dpmpp": _official_runner(FlowDPMPPScheduler, _check_dpmpp),
}
