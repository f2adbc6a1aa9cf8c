"""Runners that turn a parity case into outputs with our modules, one module per component.

Each module here exports ``RUNNERS: dict[str, Runner]`` keyed by the ``runner`` field of
``case.json``; :func:`all_runners` merges them so coverage of a set can be checked.
"""

from __future__ import annotations

import importlib

from parity_support import Runner

# Component runner modules; each is added by the change that implements its component.
MODULES: list[str] = ["dit", "vae", "text_image", "schedulers", "pipeline", "units"]


def all_runners() -> dict[str, Runner]:
    merged: dict[str, Runner] = {}
    for name in MODULES:
        merged.update(importlib.import_module(f"parity_runners.{name}").RUNNERS)
    return merged
