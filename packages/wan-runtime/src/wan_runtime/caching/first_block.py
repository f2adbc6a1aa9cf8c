"""First Block Cache: run the first block, and skip the rest while its residual barely changes.

Each step runs block 0 and compares its residual (output minus input) with the one of the last
computed step by relative L1, ``mean|now - then| / mean|then|``. Below ``threshold`` the other
blocks are skipped and their residual from that step is added to block 0's output; otherwise they
run and both residuals are stored. As in diffusers' ``FirstBlockCacheConfig`` (default 0.05) and
ParaAttention's FBCache. Under sequence parallel the two means are summed over every rank's real
(unpadded) tokens, so all ranks take the same decision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .registry import option_number, register_step_cache

DEFAULT_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default


class FirstBlockCache:
    """Skip decisions and cached residuals for one CFG branch over one generation."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self.first_residual: torch.Tensor | None = None  # block 0's residual at the last computed step
        self.residual: torch.Tensor | None = None  # blocks 1..N-1's residual at the last computed step
        self.changes: list[float] = []  # relative L1 change of block 0's residual, per step with a reference
        self.skipped: list[bool] = []

    def run(self, dit: Any, inputs: Any) -> torch.Tensor:
        """The blocks' output for ``inputs`` (a ``wan_models.DiTInputs``), computed or reused."""
        first = dit.run_blocks(inputs, end=1)
        first_residual = first - inputs.tokens
        skip = False
        if self.first_residual is not None:
            change = relative_l1(first_residual, self.first_residual, dit, inputs)
            self.changes.append(change)
            skip = change < self.threshold
        self.skipped.append(skip)
        if skip:
            return first + self.residual
        tokens = dit.run_blocks(inputs, first, start=1)
        self.first_residual, self.residual = first_residual, tokens - first
        return tokens


def relative_l1(now: torch.Tensor, then: torch.Tensor, dit: Any, inputs: Any) -> float:
    """``mean|now - then| / mean|then|`` over all tokens; on a sequence-parallel DiT, over every rank's."""
    difference, reference = (now - then).abs(), then.abs()
    parallel = getattr(dit, "parallel", None)  # a wan_runtime.parallel.SequenceParallelDiT's group and rank
    if parallel is not None:
        per_rank = now.shape[1]
        real = max(0, min(per_rank, inputs.length - parallel.rank * per_rank))  # padding rows excluded
        sums = torch.stack([difference[:, :real].sum(), reference[:, :real].sum()]).float()
        dist.all_reduce(sums, group=parallel.group)
    else:
        sums = torch.stack([difference.sum(), reference.sum()]).float()
    return (sums[0] / sums[1]).item()  # equal element counts: the ratio of sums is the ratio of means


def _first_block_cache(options: dict[str, Any], steps: int, branch: int) -> FirstBlockCache:
    """One FirstBlockCache per CFG branch."""
    return FirstBlockCache(option_number("first_block", options, "threshold", low=0.0))


register_step_cache("first_block", _first_block_cache, options={"threshold": DEFAULT_THRESHOLD})
