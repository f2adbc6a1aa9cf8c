"""Conditioning units against DiffSynth's: one test per ``pipeline_unit`` / ``camera_control`` case."""

from __future__ import annotations

import pytest

from parity_runners.units import RUNNERS
from parity_support import ParityCase, assert_matches, owned_cases


@pytest.mark.parametrize("name", owned_cases(RUNNERS))
def test_case(name: str) -> None:
    case = ParityCase.load(name)
    assert_matches(case, RUNNERS[case.runner](case))
