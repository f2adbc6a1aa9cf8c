"""Every fixture case whose runner is a sampler runner matches the reference outputs."""

from __future__ import annotations

import pytest
from parity_runners.schedulers import RUNNERS
from parity_support import ParityCase, assert_matches, owned_cases


@pytest.mark.parametrize("name", owned_cases(RUNNERS))
def test_parity(name: str) -> None:
    case = ParityCase.load(name)
    assert_matches(case, RUNNERS[case.runner](case))
