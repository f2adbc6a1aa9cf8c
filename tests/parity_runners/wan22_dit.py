"""Parity runner for the Wan 2.2 DiT: official ``WanModel`` (model_type ti2v) with per-token timesteps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parity_runners.dit import build
from parity_support import ParityCase
from wan_models import DiTConfig


def wan22_dit(case: ParityCase) -> dict[str, torch.Tensor]:
    """``out``: one batched call with ``t_tokens [B, L]``; ``out_t1d``: one call per row with ``t[b:b+1]``."""
    model = build(DiTConfig.from_official(case.config, family="wan2.2"), case.weights)
    i = case.inputs
    # The reference zero-pads every prompt to text_len and attends the padding.
    context = torch.stack([F.pad(row[:n], (0, 0, 0, model.config.text_len - int(n)))
                           for row, n in zip(i["context"], i["context_lens"])])
    with torch.no_grad():
        out = model(i["x"], i["t_tokens"], context)
        out_t1d = torch.cat([model(i["x"][b:b + 1], i["t"][b:b + 1], context[b:b + 1])
                             for b in range(i["x"].shape[0])])
    return {"out": out, "out_t1d": out_t1d}


RUNNERS = {"wan22_dit": wan22_dit}
