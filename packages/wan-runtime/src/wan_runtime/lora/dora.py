"""DoRA (weight-decomposed LoRA) merged into a weight, and taken out again exactly.

A DoRA file carries, beside a layer's factors, a magnitude ``m``: one number per output row
(peft's ``lora_magnitude_vector``, diffusers' and kohya's ``dora_scale`` of shape ``[out, 1]``) or
per input channel (LyCORIS' default ``dora_scale`` of shape ``[1, in]``). peft merges it as

    V = W + s * up @ down,    W' = m / ||V|| * V

with the norm taken per row (or per input channel), ``s`` the file's ``alpha / rank``. A strength
``a`` blends like ComfyUI's: ``W' = W + a * (m / ||V|| * V - W)``, so ``a = 1`` is peft's merge and
``a = 0`` leaves ``W``. The per-row factor ``f = m / ||V||`` is kept at merge time, which makes the
unmerge exact: ``W = (W' - a f s up @ down) / (1 - a + a f)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MIN_KEEP = 1e-4  # 1 - a + a*f below this cannot be divided out again (the unmerge) without blowing up


@dataclass
class DoraUpdate:
    """One layer's DoRA merge: ``parameter`` (a weight), its factors, magnitude and the factor used."""

    parameter: str
    scale: float  # the file's alpha / rank
    strength: float  # the caller's alpha
    down: torch.Tensor
    up: torch.Tensor
    magnitude: torch.Tensor
    per_input: bool  # one norm per input channel (LyCORIS) instead of per output row (peft)
    factor: torch.Tensor | None = field(default=None, repr=False)  # m / ||V||, set by the merge

    def _low_rank(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.scale

    def apply(self, weight: torch.Tensor, sign: float) -> torch.Tensor:
        """``weight`` (float32) with the DoRA merged (``sign`` 1) or taken out (-1)."""
        lora = self._low_rank(weight.shape, weight.device)
        if sign < 0:
            if self.factor is None:
                raise ValueError(f"{self.parameter}: this DoRA update was never merged")
            keep = 1 - self.strength + self.strength * self.factor
            return (weight - self.strength * self.factor * lora) / keep
        combined = weight + lora
        dims = (0, *range(2, weight.ndim)) if self.per_input else tuple(range(1, weight.ndim))
        norm = torch.linalg.vector_norm(combined, dim=dims, keepdim=True)
        if not bool((norm > 0).all()):
            raise ValueError(f"{self.parameter}: a row of the weight plus the DoRA update is all zero; "
                             "its direction is undefined")
        factor = self.magnitude.to(device=weight.device, dtype=torch.float32).reshape(norm.shape) / norm
        keep = 1 - self.strength + self.strength * factor
        if bool((keep.abs() < _MIN_KEEP).any()):
            raise ValueError(f"{self.parameter}: at strength {self.strength:g} the DoRA magnitude nearly zeroes "
                             "a row of the weight, which could not be unmerged; use another strength")
        self.factor = factor
        return weight * keep + self.strength * factor * lora
