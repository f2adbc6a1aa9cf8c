"""wan-models against the reference fixtures: one test per case of the set, id = case name.

The set comes from ``$WAN_PARITY_DIR`` (default ``../shared/parity``). Cases whose runner belongs
to a network of this package run here; the rest are checked by other ``test_parity*.py`` files.
"""

from __future__ import annotations

import importlib

import pytest

from parity_support import ParityCase, assert_matches, owned_cases

MODEL_RUNNER_MODULES = ["dit", "vae", "text_image"]
RUNNERS = {}
for _name in MODEL_RUNNER_MODULES:
    RUNNERS.update(importlib.import_module(f"parity_runners.{_name}").RUNNERS)


@pytest.mark.parametrize("name", owned_cases(RUNNERS))
def test_case(name: str) -> None:
    case = ParityCase.load(name)
    assert_matches(case, RUNNERS[case.runner](case))
