"""Runners that turn a parity case into outputs with our modules, one module per component.

Each module here exports ``RUNNERS: dict[str, Runner]`` keyed by the ``runner`` field of
``case.json``; :func:`all_runners` merges them so coverage of a set can be checked.
"""

from __future__ import annotations

import importlib
import pkgutil

from parity_support import Runner

# Component runner modules of the Wan 2.1 set; each is added by the change that implements its component.
MODULES: list[str] = ["dit", "vae", "text_image", "schedulers", "pipeline", "units"]
# Wan 2.2 runner modules are the files named wan22_*.py here: adding a component adds a file.
WAN22_PREFIX = "wan22_"


def modules(family: str = "wan21") -> list[str]:
    """The runner modules of a fixture family."""
    if family == "wan21":
        return MODULES
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith(WAN22_PREFIX))


def all_runners(family: str = "wan21") -> dict[str, Runner]:
    merged: dict[str, Runner] = {}
    for name in modules(family):
        merged.update(importlib.import_module(f"parity_runners.{name}").RUNNERS)
    return merged
