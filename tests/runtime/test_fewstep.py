"""Few-step LoRAs: the published timestep lists (LightX2V's ``denoising_step_list``) as sigmas, checked against
numbers worked out by hand from the published scheduler (sigma = shift(t / 1000), shift(s) = k s / (1 + (k-1) s));
their validation; the presets' data; guidance 1 runs one DiT call per step on each expert; Python API per expert."""

from __future__ import annotations

import pytest
import torch

import wan_models
from factories import load_tiny_pipeline, tiny_releases
from lora_files import lightx2v_lora, merged_by_hand
from wan_models.configs import EXPERT_FOLDERS
from wan_runtime.presets import PRESETS, apply_preset, get_preset
from wan_runtime.request import GenerationRequest
from wan_runtime.schedulers import FlowEulerScheduler

# LightX2V configs/distill/*: [1000, 750, 500, 250] at shift 5 -> sigma 1, 3.75/4, 2.5/3, 1.25/2.
LIGHTX2V_SIGMAS = [1.0, 0.9375, 2.5 / 3, 0.625, 0.0]
# Kijai's WanVideoWrapper "flowmatch_distill" list [999, 750, 500, 250], here at shift 8: 7.992/7.993, 6/6.25, 4/4.5, 2/2.75.
KIJAI_SHIFT8_SIGMAS = [7.992 / 7.993, 0.96, 4 / 4.5, 2 / 2.75, 0.0]


def schedule(step_list, shift: float) -> FlowEulerScheduler:
    scheduler = FlowEulerScheduler()
    scheduler.set_timesteps(len(step_list), shift=shift, step_list=step_list)
    return scheduler


@pytest.mark.parametrize("step_list, shift, sigmas", [
    ([1000, 750, 500, 250], 5.0, LIGHTX2V_SIGMAS),
    ([999, 750, 500, 250], 8.0, KIJAI_SHIFT8_SIGMAS),
])
def test_published_lists_become_the_published_sigmas(step_list, shift, sigmas) -> None:
    scheduler = schedule(step_list, shift)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(sigmas), rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(sigmas[:-1]) * 1000, rtol=0, atol=1e-3)


def test_the_four_step_list_at_shift_5_is_our_evenly_spaced_schedule() -> None:
    """Why a list is kept even where it changes nothing: the same sigmas, said explicitly."""
    even = FlowEulerScheduler()
    even.set_timesteps(4, shift=5.0)
    torch.testing.assert_close(schedule([1000, 750, 500, 250], 5.0).sigmas, even.sigmas)


def test_an_euler_step_moves_to_the_next_listed_sigma() -> None:
    scheduler = schedule([1000, 750, 500, 250], 5.0)
    gen = torch.Generator().manual_seed(3)
    sample, velocity = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    t = scheduler.timesteps[1]
    torch.testing.assert_close(scheduler.step(velocity, t, sample), sample + (2.5 / 3 - 0.9375) * velocity)
    last = scheduler.step(velocity, scheduler.timesteps[3], sample)  # the last step lands on sigma 0: x0
    torch.testing.assert_close(last, sample - 0.625 * velocity)


@pytest.mark.parametrize("kwargs, message", [
    (dict(denoising_step_list=[1000, 1000, 500], num_inference_steps=3),
     r"strictly decreasing: denoising_step_list\[1\]=1000 follows 1000 in \[1000, 1000, 500\]"),
    (dict(denoising_step_list=[1200, 500], num_inference_steps=2), r"denoising_step_list\[0\] must be in \(0, 1000\], got 1200"),
    (dict(denoising_step_list=[500, 0], num_inference_steps=2), r"denoising_step_list\[1\] must be in \(0, 1000\], got 0"),
    (dict(denoising_step_list=[500, float("nan")], num_inference_steps=2), r"denoising_step_list\[1\] must be a finite"),
    (dict(denoising_step_list=[1000, 750, 500, 250]), "num_inference_steps=50 but denoising_step_list has 4"),
    (dict(denoising_step_list=[1000, 500], num_inference_steps=2, sampler="unipc"), "needs sampler='euler'"),
    (dict(denoising_step_list=[1000, 500], num_inference_steps=2, denoising_strength=0.5),
     "does not combine with denoising_strength=0.5"),
    (dict(denoising_step_list=[]), "must be a non-empty list"),
    (dict(denoising_step_list="1000,500"), "must be a non-empty list"),
])
def test_bad_step_lists_are_refused_naming_the_value(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**kwargs)


def test_the_scheduler_checks_a_list_given_to_it_directly() -> None:
    with pytest.raises(ValueError, match=r"step_list\[3\]=800: the list must be strictly decreasing"):
        schedule([1000, 700, 600.0, 800], 5.0)
    with pytest.raises(ValueError, match="has 2 timesteps for 3 steps"):
        FlowEulerScheduler().set_timesteps(3, step_list=[1000, 500])


def test_the_presets_are_the_published_settings() -> None:
    for model, presets in PRESETS.items():
        spec = wan_models.MODELS[model]
        for preset in presets.values():
            assert (preset.steps, preset.shift, preset.sampler) == (4, 5.0, "euler")
            assert preset.step_list == (1000, 750, 500, 250) and preset.source
            experts = [lora.expert for lora in preset.loras]
            assert experts == (["high", "low"] if spec.experts else [None]), preset
            assert all(lora.strength == 1.0 for lora in preset.loras)
            if spec.experts:  # two steps per expert, as LightX2V's boundary_step_index 2
                timesteps = schedule(preset.step_list, preset.shift).timesteps
                assert int((timesteps >= spec.sampling.boundary * 1000).sum()) == 2
    assert "Wan2.2-TI2V-5B" not in PRESETS
    assert PRESETS["Wan2.2-T2V-A14B"]["lightning"].loras[1].filename == \
        "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/low_noise_model.safetensors"
    with pytest.raises(ValueError, match="Wan2.1-T2V-1.3B has no few-step preset; the preset 'lightning' exists for"):
        get_preset("Wan2.1-T2V-1.3B", "lightning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_releases(tmp_path_factory, "Wan2.2-T2V-A14B", "Wan2.1-T2V-14B")


def count_calls(dits) -> list:
    calls: list = []
    for dit in dits:
        dit.register_forward_pre_hook(lambda module, args, kwargs: calls.append(module), with_kwargs=True)
    return calls


def test_python_api_per_expert_and_one_dit_call_per_step(root, tmp_path) -> None:
    folder = root / "Wan-AI" / "Wan2.2-T2V-A14B"
    pipe = load_tiny_pipeline(folder, [folder / EXPERT_FOLDERS[0], folder / EXPERT_FOLDERS[1]])
    base = {name: p.detach().clone() for name, p in pipe.dit2.state_dict().items()}
    high_base = {name: p.detach().clone() for name, p in pipe.dit.state_dict().items()}
    shapes = {name: p.shape for name, p in base.items()}
    lora = lightx2v_lora(tmp_path / "low.safetensors", shapes, seed=5)
    pipe.load_lora(pipe.dit2, tmp_path / "low.safetensors", alpha=0.8)
    for name, value in merged_by_hand(base, lora, 0.8).items():
        torch.testing.assert_close(pipe.dit2.state_dict()[name], value, rtol=1e-5, atol=1e-5)
    for name, value in high_base.items():  # the other expert untouched
        assert torch.equal(pipe.dit.state_dict()[name], value)
    calls = count_calls([pipe.dit, pipe.dit2])
    kwargs = get_preset("Wan2.2-T2V-A14B", "lightning").request_kwargs(pair=True)
    latents = pipe(prompt="a red cat", height=32, width=32, num_frames=5, seed=2, output_type="latent",
                   progress_bar_cmd=lambda x: x, **kwargs)
    assert calls == [pipe.dit, pipe.dit, pipe.dit2, pipe.dit2]  # guidance 1: no negative branch
    assert bool(torch.isfinite(latents).all())


def test_a_pair_preset_is_refused_on_one_dit_before_any_download(root, tmp_path) -> None:
    folder = root / "Wan-AI" / "Wan2.1-T2V-14B"
    pipe = load_tiny_pipeline(folder, [folder])
    with pytest.raises(ValueError, match="names the high-noise expert, but the pipeline holds one DiT"):
        apply_preset(pipe, get_preset("Wan2.2-T2V-A14B", "lightning"), tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    calls = count_calls([pipe.dit])
    kwargs = get_preset("Wan2.1-T2V-14B", "lightning").request_kwargs(pair=False)
    latents = pipe(prompt="a dog", height=32, width=32, num_frames=5, seed=1, output_type="latent",
                   progress_bar_cmd=lambda x: x, **kwargs)
    assert calls == [pipe.dit] * 4 and bool(torch.isfinite(latents).all())
