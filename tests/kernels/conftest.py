"""Set-up for the wan-kernels tests.

With a CUDA GPU every GPU path runs for real. Without one, the Triton kernels run in Triton's
CPU interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, and the
interpreter reads it again while running one, so it is set here while the kernel modules are
imported (before any test module) and again around each test of this folder; the rest of the
session never sees it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_MODULES = ("rmsnorm", "rope", "modulate", "gated_residual")
INTERPRET = HAS_TRITON and not HAS_CUDA

if INTERPRET:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for _name in KERNEL_MODULES:
            importlib.import_module(f"wan_kernels.triton.{_name}")
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """``TRITON_INTERPRET=1`` during each test when the kernels run in the interpreter."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
