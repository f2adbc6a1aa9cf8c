"""``--batch_size``: a batch is one DiT call whose loss and gradients are the mean of its samples'
own (each keeps its noise, timestep and empty-prompt draw), so ``--batch_size 2`` trains as
``--gradient_accumulation_steps 2`` does; samples that cannot share a call are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_train import TrainingError, VideoDataset, WanTrainingModule, build_cache, load_pipeline, parse_args, train
from wan_train.module import TrainingInputs, sample_seed

from train.support import FRAMES, HEIGHT, WIDTH, train_argv


def _gradients(module: WanTrainingModule, samples: list[dict]) -> tuple[float, torch.Tensor]:
    module.zero_grad()
    loss = module(samples if len(samples) > 1 else samples[0])
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in module.trainable_parameters()])


def test_a_batch_is_the_mean_of_its_samples(release: Path, dataset: Path, tmp_path: Path) -> None:
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit", "--batch_size", "3",
                                 "--empty_prompt_ratio", "0.5", "--foreground_weight", "3"))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    data = VideoDataset(str(dataset), str(dataset / "metadata.csv"), num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    samples = [{**data[i], "sample_seed": sample_seed(0, 0, i)} for i in range(3)]
    batch_loss, batch_grad = _gradients(module, samples)
    singles = [_gradients(module, [sample]) for sample in samples]
    assert batch_loss == pytest.approx(sum(loss for loss, _ in singles) / 3, rel=1e-5)
    torch.testing.assert_close(batch_grad, sum(grad for _, grad in singles) / 3, rtol=1e-4, atol=1e-7)
    assert len({loss for loss, _ in singles}) == 3  # three different samples and draws


def test_batch_size_trains_as_gradient_accumulation(release: Path, dataset: Path, tmp_path: Path) -> None:
    cache = build_cache(parse_args(train_argv(release, dataset, tmp_path / "c", "--cache_latents",
                                              str(tmp_path / "cache"))))
    dit_only = json.dumps([str(release / "diffusion_pytorch_model.safetensors")])
    flags = ("--trainable_models", "dit", "--learning_rate", "1e-3", "--dataset_repeat", "2", "--use_cached",
             str(cache))
    batched = train(parse_args(train_argv(release, dataset, tmp_path / "b", *flags, "--batch_size", "2",
                                          paths=dit_only)))
    accumulated = train(parse_args(train_argv(release, dataset, tmp_path / "a", *flags,
                                              "--gradient_accumulation_steps", "2", paths=dit_only)))
    assert len(batched.losses) == 4  # 4 cached samples x 2 repeats in batches of 2
    assert batched.losses == pytest.approx(accumulated.losses, rel=1e-5)
    a, b = load_file(batched.checkpoints[-1]), load_file(accumulated.checkpoints[-1])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_samples_that_cannot_share_a_call_are_refused() -> None:
    def inputs(frames: int = 2, **extra) -> TrainingInputs:
        return TrainingInputs(torch.zeros(1, 4, frames, 2, 2), torch.zeros(1, 3, 8), **extra)

    assert TrainingInputs.stack([inputs(), inputs()]).input_latents.shape == (2, 4, 2, 2, 2)
    with pytest.raises(TrainingError, match=r"one size, got latents of shapes \[\(4, 2, 2, 2\), \(4, 3, 2, 2\)\]"):
        TrainingInputs.stack([inputs(), inputs(3)])
    with pytest.raises(TrainingError, match="differ in vace_scale"):
        TrainingInputs.stack([inputs(shared={"vace_scale": 1.0}), inputs(shared={"vace_scale": 0.5})])
    with pytest.raises(TrainingError, match="differ in their foreground"):
        TrainingInputs.stack([inputs(foreground=torch.ones(1, 1, 2, 2, 2)), inputs()])
