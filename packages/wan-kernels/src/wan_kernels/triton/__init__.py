"""Triton fused versions of the DiT's replaceable elementwise ops (``wan_models.ops``).

Each wrapper has the exact signature of its torch op and falls back to it for tensors the kernel
does not take (CPU without the interpreter, autograd, other dtypes or shapes). Importing this
package does not import triton; :func:`status` and :func:`fused_ops` do.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..attention.checks import Check, import_check


def status() -> Check:
    """``(ok, reason)``: can the fused kernels run here (triton plus a GPU, or kernels built for
    the CPU interpreter because ``TRITON_INTERPRET=1`` was set when they were first imported)."""
    ok, reason = import_check("triton", "pip install 'wan-kernels[triton]'")
    if not ok:
        return ok, reason
    if torch.cuda.is_available():
        return True, "CUDA"
    from .launch import built_for_interpreter
    from .rmsnorm import _rms_norm_kernel

    if built_for_interpreter(_rms_norm_kernel):
        return True, "Triton interpreter (CPU)"
    return False, "no CUDA GPU (the kernels run on CPU only when TRITON_INTERPRET=1 is set before import)"


def fused_ops() -> dict[str, Callable]:
    """``{op name: fused wrapper}`` for each replaceable op of ``wan_models.ops`` (imports triton)."""
    from .gated_residual import gated_residual
    from .modulate import modulate
    from .rmsnorm import rms_norm
    from .rope import apply_rope

    return {"rms_norm": rms_norm, "apply_rope": apply_rope, "modulate": modulate, "gated_residual": gated_residual}
