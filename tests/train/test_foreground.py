"""Foreground weighting: the pixel mask finds the object, its latent-grid version covers exactly the
cells a causal VAE codes those pixels into, and ``--foreground_weight`` scales the flow-matching
loss on those cells alone (also when training on a latent cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wan_train import TrainingError, WanTrainingModule, build_cache, load_pipeline, parse_args
import wan_train.module
from wan_train.cache import read_inputs, write_inputs
from wan_train.foreground import foreground_mask, latent_foreground
from wan_train.module import TrainingInputs

from train.support import FRAMES, HEIGHT, WIDTH, train_argv


def test_foreground_mask_is_the_object_on_any_background() -> None:
    for background in (-1.0, 0.0, 1.0):
        video = torch.full((1, 3, 3, 16, 16), background)
        video[0, :, 1, 4:8, 2:5] = torch.tensor([0.9, -0.8, -0.8]).view(3, 1, 1)  # a red box in frame 1
        video[0, 2, 2, 10, 10] = background + 0.1 * (1 if background < 1 else -1)  # a faint speck: background
        expected = torch.zeros(1, 1, 3, 16, 16, dtype=torch.bool)
        expected[0, 0, 1, 4:8, 2:5] = True
        assert torch.equal(foreground_mask(video), expected)


@pytest.mark.parametrize(("frame", "latent_frame"), [(0, 0), (1, 1), (4, 1), (5, 2), (16, 4)])
def test_latent_foreground_maps_pixels_to_the_cells_that_code_them(frame: int, latent_frame: int) -> None:
    mask = torch.zeros(2, 1, 17, 64, 48, dtype=torch.bool)
    mask[1, 0, frame, 17, 40] = True  # row 17 -> latent row 2, column 40 -> latent column 5
    cells = latent_foreground(mask, (5, 8, 6))
    assert cells.shape == (2, 1, 5, 8, 6) and cells.dtype == torch.float32
    assert cells.sum() == 1 and cells[1, 0, latent_frame, 2, 5] == 1


def test_latent_foreground_of_single_frames_and_bad_grids() -> None:
    mask = torch.zeros(1, 1, 1, 16, 16, dtype=torch.bool)
    mask[0, 0, 0, 15, 0] = True
    assert latent_foreground(mask, (1, 2, 2)).flatten().tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="a 17x64x64 pixel mask does not tile the 4x8x8 latent grid"):
        latent_foreground(torch.zeros(1, 1, 17, 64, 64, dtype=torch.bool), (4, 8, 8))


def _inputs(foreground: torch.Tensor | None) -> TrainingInputs:
    generator = torch.Generator().manual_seed(3)
    return TrainingInputs(torch.randn(1, 16, 2, 4, 6, generator=generator), torch.randn(1, 8, 32, generator=generator),
                          foreground=foreground)


def test_foreground_weight_scales_the_loss_of_foreground_cells_only(release: Path, dataset: Path,
                                                                    tmp_path: Path) -> None:
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit"))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    predictions = []

    def predict(x, t, context, shared):  # the same random prediction every call, recorded
        predictions.append(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
        return predictions[-1]

    module.predict = predict
    foreground = torch.zeros(1, 1, 2, 4, 6)
    foreground[..., 1, 2:4, 0:3] = 1.0
    with torch.no_grad():
        plain = module.loss(_inputs(foreground), 5)
        module.foreground_weight = 4.0
        weighted = module.loss(_inputs(foreground), 5)
        none_set = module.loss(_inputs(torch.zeros_like(foreground)), 5)
        all_set = module.loss(_inputs(torch.ones_like(foreground)), 5)
        with pytest.raises(TrainingError, match="--foreground_weight needs the foreground"):
            module.loss(_inputs(None), 5)
    assert all(torch.equal(p, predictions[0]) for p in predictions)
    torch.testing.assert_close(none_set, plain)
    torch.testing.assert_close(all_set, 4 * plain)
    # Recompute the weighted loss from its parts: the per-cell squared error of the same draw.
    inputs = _inputs(foreground)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(inputs.input_latents.shape, generator=generator)
    index = torch.randint(*module.timestep_range, (1,), generator=generator)
    timestep = module.scheduler.timesteps[index]
    error = (predictions[0] - (noise - inputs.input_latents)).square()
    cells = 1 + 3 * foreground
    expected = (cells * error).mean() * module.scheduler.training_weight(timestep)
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(plain, F.mse_loss(predictions[0], noise - inputs.input_latents)
                               * module.scheduler.training_weight(timestep))


def _square_clip() -> list[Image.Image]:
    """A red square on a light background that appears in frame 1 inside one 8x8 block and moves right."""
    frames = []
    for t in range(FRAMES):
        array = np.full((HEIGHT, WIDTH, 3), 230, dtype=np.uint8)
        if t:
            array[9:15, 16 + t:20 + t] = (200, 30, 30)  # inside rows 8..15, columns 16..23 in every frame
        frames.append(Image.fromarray(array))
    return frames


def test_prepared_and_cached_inputs_carry_the_video_foreground(release: Path, dataset: Path, tmp_path: Path) -> None:
    """A square that appears in frame 1 inside one 8x8 block is one foreground cell, in latent frame 1."""
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit"))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    inputs = module.prepare_inputs({"video": _square_clip(), "prompt": "a red square"})
    expected = torch.zeros(1, 1, *inputs.input_latents.shape[2:])
    expected[0, 0, 1, 1, 2] = 1.0
    assert torch.equal(inputs.foreground, expected)
    write_inputs(inputs, tmp_path / "sample.safetensors")
    assert torch.equal(read_inputs(tmp_path / "sample.safetensors").foreground, inputs.foreground)

    cache = build_cache(parse_args(train_argv(release, dataset, tmp_path / "c", "--cache_latents",
                                              str(tmp_path / "cache"))))
    cached = read_inputs(cache / "00000000.safetensors")
    assert cached.foreground is not None and cached.foreground.shape[2:] == cached.input_latents.shape[2:]


def test_uncached_steps_compute_the_mask_only_when_it_is_weighted(release: Path, dataset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask is a median over the whole video: a step at ``--foreground_weight 1`` skips it, a
    weighted step computes it once and weighs with it."""
    args = parse_args(train_argv(release, dataset, tmp_path, "--trainable_models", "dit"))
    module = WanTrainingModule.from_args(args, load_pipeline(args))
    calls = []
    monkeypatch.setattr(wan_train.module, "foreground_mask", lambda video: calls.append(1) or foreground_mask(video))
    sample = {"video": _square_clip(), "prompt": "a red square", "sample_seed": 7}
    with torch.no_grad():
        module(sample)
        assert calls == []
        module.foreground_weight = 5.0
        loss = module(sample)
        assert calls == [1]
        torch.testing.assert_close(loss, module.loss(module.prepare_inputs(sample), 7))
