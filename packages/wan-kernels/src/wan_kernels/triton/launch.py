"""When a fused kernel may run, shared by the four op wrappers.

A kernel runs on CUDA tensors, or on CPU tensors when it was built for Triton's interpreter
(built and run with ``TRITON_INTERPRET=1``: how the tests run on CPU).
Anything else, and any call that needs autograd, goes to the torch reference op.
"""

from __future__ import annotations

import os

import torch
from triton.runtime.interpreter import InterpretedFunction

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def built_for_interpreter(kernel: object) -> bool:
    """Whether ``kernel`` was built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return isinstance(kernel, InterpretedFunction)


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` can run in the interpreter now: built for it, and ``TRITON_INTERPRET=1`` is
    still set (the interpreter reads it again while running)."""
    return built_for_interpreter(kernel) and os.environ.get("TRITON_INTERPRET") == "1"


def use_kernel(kernel: object, *tensors: torch.Tensor) -> bool:
    """Whether ``kernel`` can take ``tensors``: one device it runs on, fused dtypes, no autograd."""
    device = tensors[0].device
    if device.type != ("cpu" if interpreted(kernel) else "cuda"):
        return False
    if any(t.device != device or t.dtype not in FUSED_DTYPES for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def num_warps(block: int) -> int:
    """Warps for a program handling ``block`` elements (about 256 elements per warp, 1..16)."""
    return max(1, min(16, block // 256))
