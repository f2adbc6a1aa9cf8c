"""Multi-GPU inference: unified sequence parallel (USP) for the DiT (see ``docs/multi_gpu.md``)."""

from .usp import (
    SequenceParallel,
    SequenceParallelAttention,
    SequenceParallelDiT,
    ShardedInputs,
    enable_usp,
    head_split,
    init_process_group,
    ulysses_attention,
)

__all__ = [
    "SequenceParallel",
    "SequenceParallelAttention",
    "SequenceParallelDiT",
    "ShardedInputs",
    "enable_usp",
    "head_split",
    "init_process_group",
    "ulysses_attention",
]
