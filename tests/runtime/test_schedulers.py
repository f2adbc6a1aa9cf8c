"""Behaviour of the samplers beyond the reference fixtures: schedules, errors, state, convergence."""

from __future__ import annotations

import math

import pytest
import torch

from wan_runtime.schedulers import (
    SCHEDULERS,
    FlowDPMPPScheduler,
    FlowEulerScheduler,
    FlowUniPCScheduler,
    make_scheduler,
)
from wan_runtime.schedulers.base import shift_sigmas

NAMES = ["euler", "unipc", "dpmpp"]


def _run(sched, x: torch.Tensor, velocity) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The denoising loop a pipeline runs: model at each timestep, then ``step``."""
    trajectory = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x, sched.sigmas[i], t), t, x)
        trajectory.append(x)
    return x, trajectory


def _toy_velocity(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A linear stand-in for a network: depends on the sample and on the timestep it is given."""
    return 0.3 * x + 0.5 * torch.cos(x) * (float(t) / 1000.0)


# --- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_schedule_shapes_and_terminal_sigma(name: str) -> None:
    sched = make_scheduler(name, shift=5.0)
    sched.set_timesteps(12)
    assert sched.timesteps.shape == (12,) and sched.sigmas.shape == (13,)
    assert sched.sigmas[-1] == 0.0
    assert torch.all(sched.sigmas[1:] < sched.sigmas[:-1]), "sigmas must strictly decrease"
    assert torch.all(sched.timesteps[1:] <= sched.timesteps[:-1])


def test_official_solvers_use_truncated_int64_timesteps() -> None:
    unipc, dpmpp = FlowUniPCScheduler(shift=5.0), FlowDPMPPScheduler(shift=5.0)
    unipc.set_timesteps(50)
    dpmpp.set_timesteps(50)
    for sched in (unipc, dpmpp):
        assert sched.timesteps.dtype == torch.int64
        assert torch.equal(sched.timesteps, (sched.sigmas[:-1].double() * 1000).floor().long())
    # UniPC starts below 1 (0.999 before the shift), DPM++ at exactly 1.
    assert unipc.timesteps[0] == 999 and 0.9997 < unipc.sigmas[0] < 1.0
    assert dpmpp.timesteps[0] == 1000 and dpmpp.sigmas[0] == 1.0


def test_euler_schedule_is_shifted_linspace() -> None:
    sched = FlowEulerScheduler()
    sched.set_timesteps(10, shift=3.0)
    base = torch.linspace(1.0, 0.0, 11)[:-1]
    assert torch.allclose(sched.sigmas[:-1], 3 * base / (1 + 2 * base))
    assert torch.allclose(sched.timesteps, sched.sigmas[:-1] * 1000)
    assert sched.timesteps.dtype == torch.float32


def test_shift_uses_constructor_default_and_per_call_override() -> None:
    a, b = FlowUniPCScheduler(shift=3.0), FlowUniPCScheduler(shift=5.0)
    a.set_timesteps(20)
    b.set_timesteps(20, shift=3.0)
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)
    b.set_timesteps(20)  # the override does not stick
    assert b.sigmas[1] > a.sigmas[1]


def test_shift_one_is_identity() -> None:
    s = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert torch.all(shift_sigmas(s[1:-1], 5.0) > s[1:-1])


def test_denoising_strength_below_one_starts_later() -> None:
    full, partial = FlowEulerScheduler(), FlowEulerScheduler()
    full.set_timesteps(10, shift=5.0)
    partial.set_timesteps(10, denoising_strength=0.6, shift=5.0)
    expected_start = 5 * 0.6 / (1 + 4 * 0.6)
    assert partial.sigmas[0] == pytest.approx(expected_start, rel=1e-6)
    assert partial.timesteps[0] == pytest.approx(expected_start * 1000, rel=1e-6)
    assert partial.timesteps[0] < full.timesteps[0]
    assert len(partial.timesteps) == 10 and partial.sigmas[-1] == 0.0
    # strength 0: nothing to denoise, every step leaves the sample unchanged
    partial.set_timesteps(4, denoising_strength=0.0)
    x = torch.randn(5)
    final, _ = _run(partial, x, lambda x, s, t: torch.ones_like(x))
    assert torch.equal(final, x)


# --- the last step lands at sigma 0 ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_last_step_returns_clean_sample(name: str) -> None:
    """With the exact velocity of a single data point, every sampler ends on that point."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 16, 3, 4, 4)
    noise = torch.randn_like(x0)
    sched = make_scheduler(name, shift=5.0)
    sched.set_timesteps(7)
    sigma0 = sched.sigmas[0]
    x = (1 - sigma0) * x0 + sigma0 * noise
    final, trajectory = _run(sched, x, lambda x, s, t: (x - x0) / s)
    torch.testing.assert_close(final, x0, rtol=1e-5, atol=1e-5)
    # and the trajectory passes through the scheduled noise levels of that straight line
    for i in range(len(trajectory) - 1):
        s = sched.sigmas[i + 1]
        torch.testing.assert_close(trajectory[i], (1 - s) * x0 + s * noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["unipc", "dpmpp"])
def test_official_final_step_is_x0_prediction(name: str) -> None:
    torch.manual_seed(1)
    sched = make_scheduler(name)
    sched.set_timesteps(5)
    x = torch.randn(3, 8)
    for i, t in enumerate(sched.timesteps):
        v = _toy_velocity(x, sched.sigmas[i], t)
        x_in, x = x, sched.step(v, t, x)
    assert torch.equal(x, x_in - sched.sigmas[-2] * v)


@pytest.mark.parametrize("name", NAMES)
def test_single_step_generation(name: str) -> None:
    sched = make_scheduler(name)
    sched.set_timesteps(1)
    x = torch.randn(4)
    v = torch.randn(4)
    out = sched.step(v, sched.timesteps[0], x)
    torch.testing.assert_close(out, x - sched.sigmas[0] * v)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
def test_bad_step_count_is_named(name: str, steps) -> None:
    sched = make_scheduler(name)
    with pytest.raises(ValueError, match=rf"num_inference_steps.*{steps!r}"):
        sched.set_timesteps(steps)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_bad_denoising_strength_is_named(strength: float) -> None:
    with pytest.raises(ValueError, match=rf"denoising_strength.*{strength!r}"):
        FlowEulerScheduler().set_timesteps(10, denoising_strength=strength)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shift", [0.0, -1.0, float("inf")])
def test_bad_shift_is_named(name: str, shift: float) -> None:
    with pytest.raises(ValueError, match=rf"shift.*{shift!r}"):
        make_scheduler(name, shift=shift)
    with pytest.raises(ValueError, match=rf"shift.*{shift!r}"):
        make_scheduler(name).set_timesteps(10, shift=shift)


def test_unknown_sampler_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'ddim'.*'euler', 'unipc', 'dpmpp'"):
        make_scheduler("ddim")
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("dpm++")


@pytest.mark.parametrize("name", NAMES)
def test_step_before_set_timesteps_fails(name: str) -> None:
    with pytest.raises(RuntimeError, match="set_timesteps"):
        make_scheduler(name).step(torch.zeros(2), 999, torch.zeros(2))


@pytest.mark.parametrize("name", ["unipc", "dpmpp"])
def test_multistep_solvers_reject_out_of_order_and_extra_steps(name: str) -> None:
    sched = make_scheduler(name)
    sched.set_timesteps(3)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=rf"step 0 of 3 expects timestep {int(sched.timesteps[0])}"):
        sched.step(x, sched.timesteps[1], x)
    for t in sched.timesteps:
        x = sched.step(torch.ones(2), t, x)
    with pytest.raises(RuntimeError, match="all 3 steps are done"):
        sched.step(x, sched.timesteps[-1], x)


def test_training_weight_needs_training_schedule() -> None:
    sched = FlowEulerScheduler()
    sched.set_timesteps(50)
    with pytest.raises(RuntimeError, match="training=True"):
        sched.training_weight(torch.tensor(500.0))


def test_multi_element_timestep_is_rejected() -> None:
    sched = FlowEulerScheduler()
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="single timestep"):
        sched.step(torch.zeros(2), sched.timesteps[:2], torch.zeros(2))


# --- state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_set_timesteps_resets_state_between_generations(name: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 16, 2, 3, 3)
    fresh = make_scheduler(name, shift=5.0)
    fresh.set_timesteps(6)
    want, want_traj = _run(fresh, x, _toy_velocity)

    reused = make_scheduler(name, shift=5.0)
    reused.set_timesteps(9, shift=3.0)
    _run(reused, torch.randn_like(x), _toy_velocity)  # a whole other generation
    reused.set_timesteps(6)
    for t in list(reused.timesteps)[:2]:  # and an abandoned one
        reused.step(torch.randn_like(x), t, torch.randn_like(x))
    reused.set_timesteps(6)
    got, got_traj = _run(reused, x, _toy_velocity)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_traj, want_traj))


@pytest.mark.parametrize("name", ["unipc", "dpmpp"])
def test_half_precision_sample_keeps_its_dtype(name: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 4, 2, 2)
    sched = make_scheduler(name)
    sched.set_timesteps(5)
    out32, _ = _run(sched, x, _toy_velocity)
    sched.set_timesteps(5)
    out16, _ = _run(sched, x.bfloat16(), _toy_velocity)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=0.05, atol=0.05)


# --- factory --------------------------------------------------------------------------------


def test_factory_builds_each_sampler_with_its_kwargs() -> None:
    assert set(SCHEDULERS) == {"euler", "unipc", "dpmpp"}
    expected = {"euler": FlowEulerScheduler, "unipc": FlowUniPCScheduler, "dpmpp": FlowDPMPPScheduler}
    for name, cls in expected.items():
        sched = make_scheduler(name, shift=3.0, num_train_timesteps=1000)
        assert type(sched) is cls and sched.shift == 3.0
        assert make_scheduler(name) is not make_scheduler(name)  # no shared state


# --- training (Euler) -----------------------------------------------------------------------


def test_training_schedule_noise_target_and_weights() -> None:
    sched = FlowEulerScheduler(shift=5.0)
    sched.set_timesteps(1000, training=True)
    w = sched.training_weights
    assert w.shape == (1000,) and w.min() == 0.0
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    peak = int(torch.argmax(w))
    assert abs(float(sched.timesteps[peak]) - 500.0) < 2.0  # bell centred on t = 500
    k = 321
    t = sched.timesteps[k]
    assert sched.training_weight(t) == w[k]
    assert sched.training_weight(t + 0.01) == w[k]  # nearest scheduled timestep
    x0, noise = torch.randn(3, 5), torch.randn(3, 5)
    s = sched.sigmas[k]
    torch.testing.assert_close(sched.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    assert torch.equal(sched.training_target(x0, noise, t), noise - x0)


# --- convergence on a toy ODE with a known solution -------------------------------------------

# Data ~ N(MU, S^2) per element: the exact flow velocity is affine in x and the ODE keeps
# (x - (1 - sigma) * MU) / sqrt(var(sigma)) constant, var(sigma) = (1 - sigma)^2 S^2 + sigma^2.
MU, S = 0.7, 2.0


def _gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sigma = float(sigma)
    var = (1 - sigma) ** 2 * S**2 + sigma**2
    return (sigma - (1 - sigma) * S**2) / var * (x - (1 - sigma) * MU) - MU


def _gaussian_endpoint(x: torch.Tensor, sigma0: float) -> torch.Tensor:
    var = (1 - sigma0) ** 2 * S**2 + sigma0**2
    return MU + S * (x - (1 - sigma0) * MU) / math.sqrt(var)


def _toy_error(name: str, steps: int) -> float:
    sched = make_scheduler(name, shift=3.0)
    sched.set_timesteps(steps)
    x = torch.linspace(-3, 3, 13)  # float32, as a pipeline runs it
    final, _ = _run(sched, x, _gaussian_velocity)
    exact = _gaussian_endpoint(x.double(), float(sched.sigmas[0]))
    return (final.double() - exact).abs().max().item()


@pytest.mark.parametrize("name, min_ratio", [("euler", 1.8), ("unipc", 3.0), ("dpmpp", 3.0)])
def test_toy_ode_converges_to_exact_solution(name: str, min_ratio: float) -> None:
    """Error shrinks as steps grow; halving the step size cuts it ~2x (Euler) or ~4x (order 2)."""
    errors = [_toy_error(name, n) for n in (25, 50, 100, 200)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-2] / errors[-1] > min_ratio, errors
    assert errors[-1] < (6e-2 if name == "euler" else 3e-3), errors


def test_multistep_solvers_beat_euler() -> None:
    euler = _toy_error("euler", 50)
    assert _toy_error("unipc", 50) < euler / 5
    assert _toy_error("dpmpp", 50) < euler / 5
