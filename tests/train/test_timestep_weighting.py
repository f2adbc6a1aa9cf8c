"""--timestep_weighting: the seed's bell weights (recomputed here from their formula) or none at all."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wan_train import TrainingError, WanTrainingModule, load_pipeline, parse_args
from wan_train.module import TrainingInputs

from train.support import train_argv


def bell(timestep: float, timesteps: torch.Tensor) -> float:
    """DiffSynth's weight of ``timestep`` on the 1000-step schedule ``timesteps``: a Gaussian bump
    around t = 500, its minimum over the schedule subtracted, scaled to mean 1 over the schedule."""
    curve = lambda t: math.exp(-2 * ((t - 500) / 1000) ** 2)  # noqa: E731
    low = min(curve(t) for t in timesteps.tolist())
    total = sum(curve(t) - low for t in timesteps.tolist())
    return (curve(timestep) - low) * len(timesteps) / total


@pytest.mark.parametrize("weighting", ["bell", "uniform"])
def test_loss_weight_of_the_drawn_timestep(weighting: str, release: Path, dataset: Path, tmp_path: Path) -> None:
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit",
                                 "--timestep_weighting", weighting))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    prediction = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    module.predict = lambda x, t, context, shared: prediction
    generator = torch.Generator().manual_seed(3)
    inputs = TrainingInputs(torch.randn(1, 16, 2, 4, 6, generator=generator), torch.randn(1, 8, 32, generator=generator))
    for seed in (5, 6, 7):
        with torch.no_grad():
            loss = module.loss(inputs, seed)
        draw = torch.Generator().manual_seed(seed)  # the sample's own draws: noise, then the timestep index
        noise = torch.randn(inputs.input_latents.shape, generator=draw)
        timestep = module.scheduler.timesteps[torch.randint(*module.timestep_range, (1,), generator=draw)].item()
        mse = F.mse_loss(prediction, noise - inputs.input_latents).item()
        weight = bell(timestep, module.scheduler.timesteps) if weighting == "bell" else 1.0
        assert loss.item() == pytest.approx(mse * weight, rel=1e-5), (seed, timestep)


def test_unknown_weighting_is_refused(release: Path, dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit", "--timestep_weighting", "cosmap"))
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit"))
    with pytest.raises(TrainingError, match="unknown timestep weighting 'cosmap'"):
        WanTrainingModule(load_pipeline(args), timestep_weighting="cosmap")
