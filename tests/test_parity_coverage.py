"""Every case of the fixture set must be owned by some runner; none may pass by being ignored.

A runner that belongs to a component not built yet is reported as an expected failure naming
it ("not yet covered"), never as a pass; an unknown runner is a failure.
"""

from __future__ import annotations

import pytest

from parity_runners import all_runners
from parity_support import ParityCase, case_names

# Runners of components whose packages are still to come (removed as each lands).
NOT_YET_COVERED = {
    "vae_encode", "vae_decode", "vae_tiled",
    "pipeline_unit", "camera_control",
}


@pytest.mark.parametrize("name", case_names())
def test_case_has_runner(name: str) -> None:
    runner = ParityCase.load(name).runner
    if runner in all_runners():
        return
    if runner in NOT_YET_COVERED:
        pytest.xfail(f"{name}: runner {runner!r} not yet covered")
    pytest.fail(f"{name}: runner {runner!r} is handled by no test_parity file")
