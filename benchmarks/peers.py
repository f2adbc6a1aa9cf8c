"""Importing the peers (diffusers, DiffSynth-Studio) for the comparison benchmarks.

DiffSynth 2.x's package ``__init__`` imports its data tools and with them torchvision; a torchvision
wheel built for CUDA next to a CPU torch fails at import (``operator torchvision::nms does not exist``),
and then no DiffSynth module can be imported. The model files themselves need neither: when the normal
import fails, ``diffsynth_module`` loads the requested module with the ``diffsynth`` and
``diffsynth.core`` package ``__init__`` files skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

#: How DiffSynth was imported: "package" (normal) or "bare modules (...)" (package __init__ skipped).
DIFFSYNTH_IMPORT = "package"


def diffsynth_version() -> str:
    from importlib.metadata import version

    return version("diffsynth")


def diffsynth_module(name: str) -> types.ModuleType:
    """``diffsynth.<name>``, e.g. ``models.wan_video_dit``; raises ImportError when not installed."""
    global DIFFSYNTH_IMPORT
    try:
        return importlib.import_module(f"diffsynth.{name}")
    except ImportError as e:
        if importlib.util.find_spec("diffsynth") is None:
            raise
        error: Exception = e
    except (RuntimeError, OSError) as e:  # torchvision's broken extension surfaces as RuntimeError
        error = e
    for key in [k for k in sys.modules if k == "diffsynth" or k.startswith("diffsynth.")]:
        del sys.modules[key]
    spec = importlib.util.find_spec("diffsynth")
    root = Path(spec.origin).parent
    for package, folder in (("diffsynth", root), ("diffsynth.core", root / "core")):
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]  # a bare package: its __init__ is not run
        sys.modules[package] = module
    DIFFSYNTH_IMPORT = f"bare modules (package import failed: {type(error).__name__}: {str(error)[:60]})"
    return importlib.import_module(f"diffsynth.{name}")
