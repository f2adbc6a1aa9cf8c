"""Parity runner for the Wan2.2-A14B expert switch (``wan_runtime.experts``) over our UniPC and DPM++
solvers; calling convention in shared/parity-wan22/README.md."""

from __future__ import annotations

import torch
from parity_support import ParityCase, Runner

from wan_runtime.experts import HIGH, ExpertSwitch
from wan_runtime.schedulers import FlowDPMPPScheduler, FlowUniPCScheduler

SOLVERS = {"unipc": FlowUniPCScheduler, "dpm++": FlowDPMPPScheduler}


def run_switch(case: ParityCase) -> dict[str, torch.Tensor]:
    """Each setting: one solver across the switch; per step the expert, its guidance and the stand-in
    experts ``a_E * x + b_E * (int(t) / 1000) + c_branch`` guided as ``uncond + g * (cond - uncond)``."""
    inputs = case.inputs
    out: dict[str, torch.Tensor] = {}
    for i, setting in enumerate(case.literal_args["settings"]):
        switch = ExpertSwitch(setting["boundary"], tuple(setting["sample_guide_scale"]),
                              case.config["num_train_timesteps"])
        solver = SOLVERS[setting["solver"]](shift=1.0, num_train_timesteps=switch.num_train_timesteps)
        solver.set_timesteps(setting["sample_steps"], shift=setting["sample_shift"])
        x, experts, scales, samples = inputs["sample"], [], [], []
        for t in solver.timesteps:
            key = "high" if switch.expert(t) == HIGH else "low"
            base = inputs[f"a_{key}"] * x + inputs[f"b_{key}"] * (int(t) / 1000.0)
            cond, uncond = base + inputs["c_cond"], base + inputs["c_null"]
            scale = switch.guidance_scale(t)
            x = solver.step(uncond + scale * (cond - uncond), t, x)
            experts.append(int(key == "high"))
            scales.append(scale)
            samples.append(x)
        out[f"timesteps_{i}"] = solver.timesteps
        out[f"expert_{i}"] = torch.tensor(experts, dtype=torch.int64)
        out[f"guide_scale_{i}"] = torch.tensor(scales)
        out[f"samples_{i}"] = torch.stack(samples)
        out[f"final_{i}"] = x
    return out


RUNNERS: dict[str, Runner] = {"wan22_moe_switch": run_switch}
