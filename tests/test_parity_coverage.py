"""Every case of the fixture set must be owned by a runner of some ``test_parity*.py``; a case whose
runner nobody handles fails here instead of passing by being ignored."""

from __future__ import annotations

import pytest

from parity_runners import all_runners
from parity_support import ParityCase, case_names


@pytest.mark.parametrize("name", case_names())
def test_case_has_runner(name: str) -> None:
    runner = ParityCase.load(name).runner
    assert runner in all_runners(), f"{name}: runner {runner!r} is handled by no test_parity file"


@pytest.mark.parametrize("name", case_names("wan22"))
def test_wan22_case_has_runner(name: str) -> None:
    runner = ParityCase.load(name, "wan22").runner
    assert runner in all_runners("wan22"), f"{name}: runner {runner!r} is in no parity_runners/wan22_*.py"
