"""Wan 2.2 networks and rules against the reference fixtures: one test per case, id = case name.

The set comes from ``$WAN22_PARITY_DIR`` (default ``../shared/parity-wan22``, format in its README);
runners are the ``parity_runners/wan22_*.py`` modules.
"""

from __future__ import annotations

import pytest

from parity_runners import all_runners
from parity_support import ParityCase, assert_matches, owned_cases

RUNNERS = all_runners("wan22")


@pytest.mark.parametrize("name", owned_cases(RUNNERS, "wan22"))
def test_case(name: str) -> None:
    case = ParityCase.load(name, "wan22")
    assert_matches(case, RUNNERS[case.runner](case))
