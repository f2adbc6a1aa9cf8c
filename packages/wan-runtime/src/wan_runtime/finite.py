"""Non-finite values are errors: a NaN that reaches the decoder becomes an all-black video with exit 0.

Inputs (embeddings, LoRA factors, merged weights) are checked once where they enter; the latents
once per denoising step, so a run that goes non-finite stops at that step and says which.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["NonFiniteError", "check_finite", "check_finite_tensors", "count_non_finite"]


class NonFiniteError(ValueError):
    """A tensor holding NaN or infinite values where finite numbers are needed."""


def count_non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaNs, infinities)`` in a floating tensor (``(0, 0)`` for other dtypes)."""
    if not tensor.is_floating_point():
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and the NaN/inf counts) if ``tensor`` is not all finite."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    nans, infs = count_non_finite(tensor)
    raise NonFiniteError(f"{what} holds non-finite values ({nans} NaN, {infs} inf of {tensor.numel()})"
                         + (f"; {hint}" if hint else ""))


def check_finite_tensors(tensors: Mapping[str, Any], what: str, hint: str = "") -> None:
    """:func:`check_finite` on every tensor value of ``tensors``, named ``what['key']``."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            check_finite(value, f"{what}[{key!r}]", hint)
