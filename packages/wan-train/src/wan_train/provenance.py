"""What a checkpoint was trained for: the model's identity and the resolved flags, in and beside it.

Every exported file (``epoch-N`` / ``step-N``) carries two header keys (the names of
:mod:`wan_runtime.lora.layouts`): ``wan.base``, the JSON identity of the trained DiT (family, expert,
variant, width, depth, registry model), and ``wan.training_args``, the JSON of the flags as the run
resolved them (``--expert``'s timestep range filled in). The same record is written beside it as
``<name>.json``, readable without a safetensors reader. A LoRA of the DiT goes through
:func:`wan_runtime.lora.layouts.save_lora` in the ``--lora_format`` layout, with its scale where
that layout's readers look; other checkpoints keep the official names.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from peft import LoraConfig

from wan_models import WanDiT
from wan_runtime.lora.layouts import ARGS_KEY, BASE_KEY, save_lora

from .experts import registry_name
from .outputs import atomic_write, writing
from .state import save_weights

logger = logging.getLogger(__name__)

__all__ = ["base_identity", "provenance_path", "save_checkpoint"]


def base_identity(dit: WanDiT, expert: str | None = None) -> dict[str, Any]:
    """The ``wan.base`` record of the trained DiT; ``expert`` (``--expert``) where its files said none."""
    identity = dit.identity
    config = dit.config
    return {"family": config.family, "expert": (identity.expert if identity is not None else None) or expert,
            "variant": config.variant, "dim": config.dim, "num_layers": config.num_layers,
            "model": registry_name(dit)}


def provenance_path(checkpoint: Path) -> Path:
    """The JSON record beside ``checkpoint``: ``epoch-0.safetensors`` -> ``epoch-0.json``."""
    return checkpoint.with_suffix(".json")


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], args: argparse.Namespace,
                    base: Mapping[str, Any], lora: LoraConfig | None, lora_only: bool) -> Path:
    """Write the trained ``tensors`` (export names) to ``path`` with the provenance header, and the
    record beside it. ``lora_only`` (LoRA layers and nothing else trained) writes through ``save_lora``
    in ``--lora_format``; anything else as plain official names (with the legacy rank/alpha keys)."""
    flags = {key: value for key, value in sorted(vars(args).items())}
    metadata = {BASE_KEY: json.dumps(base, sort_keys=True), ARGS_KEY: json.dumps(flags, sort_keys=True)}
    if lora_only:
        cpu = {name: tensor.detach().to("cpu") for name, tensor in tensors.items()}
        with writing(path):
            save_lora(path, cpu, args.lora_format, alpha=lora.lora_alpha, metadata=metadata)
    else:
        if lora is not None:
            metadata.update(lora_rank=str(lora.r), lora_alpha=str(lora.lora_alpha))
        save_weights(tensors, path, metadata)
    record = {"checkpoint": path.name, "format": args.lora_format if lora_only else "official",
              "base": dict(base), "training_args": flags}
    atomic_write(provenance_path(path), lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    logger.info("saved %d trained tensors to %s (%s), provenance in %s", len(tensors), path, record["format"],
                provenance_path(path).name)
    return path
