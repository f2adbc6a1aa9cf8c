"""The Wan2.2-A14B expert rule on our solvers: the released step split and bad settings."""

from __future__ import annotations

import math

import pytest

from wan_runtime.experts import HIGH, LOW, ExpertSwitch
from wan_runtime.schedulers import FlowDPMPPScheduler, FlowUniPCScheduler


@pytest.mark.parametrize("solver", [FlowUniPCScheduler, FlowDPMPPScheduler])
@pytest.mark.parametrize("boundary, shift, high_steps", [(0.875, 12.0, 26), (0.900, 5.0, 15)])
def test_the_released_settings_split_40_steps_as_the_official_code(solver, boundary, shift, high_steps) -> None:
    """T2V-A14B runs 26 high-noise then 14 low-noise steps, I2V-A14B 15 then 25 (fixture README)."""
    switch = ExpertSwitch(boundary, (3.0, 4.0))
    sched = solver(shift=1.0)
    sched.set_timesteps(40, shift=shift)
    experts = [switch.expert(t) for t in sched.timesteps]
    assert experts == [HIGH] * high_steps + [LOW] * (40 - high_steps)
    assert [switch.guidance_scale(t) for t in sched.timesteps] == [4.0] * high_steps + [3.0] * (40 - high_steps)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(boundary=1.5, guidance=(3.0, 4.0)), "boundary must be in [0, 1], got 1.5"),
    (dict(boundary=math.nan, guidance=(3.0, 4.0)), "boundary must be a finite number"),
    (dict(boundary=0.9, guidance=(3.0,)), "guidance must be a (low-noise, high-noise) pair"),
    (dict(boundary=0.9, guidance=(3.0, math.inf)), "guidance[1] (high noise) must be a finite number"),
])
def test_bad_settings_are_named(kwargs, fragment) -> None:
    with pytest.raises(ValueError) as error:
        ExpertSwitch(**kwargs)
    assert fragment in str(error.value)
