"""Shipped launch configs: DeepSpeed JSON for ``--deepspeed`` and accelerate YAML for ``accelerate launch``.

=====================================  ===========================================================
``deepspeed_zero2.json``               ZeRO-2, optimizer states offloaded to CPU memory (the seed's
                                       14B setup)
``deepspeed_zero3.json``               ZeRO-3: weights, gradients and optimizer states sharded over
                                       the GPUs
``accelerate_multi_gpu.yaml``          DDP on 8 GPUs, bf16 (LoRA, or full fine-tuning of 1.3B models)
``accelerate_config_14B.yaml``         DeepSpeed ZeRO-2 with CPU optimizer offload on 8 GPUs, bf16
``accelerate_config_14B_zero3.yaml``   DeepSpeed ZeRO-3 on 8 GPUs, bf16
=====================================  ===========================================================

Batch size, accumulation and precision are ``"auto"`` in the JSON files: accelerate fills them in from
the run (one sample per GPU, ``--gradient_accumulation_steps``, the launch's mixed precision).
Gradient clipping is off (``0.0``), as in DDP runs; the trainer also turns off DeepSpeed's silent
default of clipping at norm 1.0 when an accelerate config says nothing about it.
"""

from __future__ import annotations

from pathlib import Path

from ..args import TrainingError

CONFIG_DIR = Path(__file__).parent
DEEPSPEED_CONFIGS = {"zero2": CONFIG_DIR / "deepspeed_zero2.json", "zero3": CONFIG_DIR / "deepspeed_zero3.json"}


def deepspeed_config(name_or_path: str) -> Path:
    """The JSON file of a shipped name (``zero2``, ``zero3``) or of a path."""
    path = DEEPSPEED_CONFIGS.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise TrainingError(f"--deepspeed {name_or_path}: no such file; pass zero2, zero3 or a DeepSpeed JSON path")
    return path
