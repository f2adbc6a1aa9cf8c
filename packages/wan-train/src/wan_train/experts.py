"""Training one expert of a Wan 2.2 A14B pair: which files to load, and which timesteps it learns.

An A14B model is two DiTs: the high-noise expert serves ``t >= boundary * 1000`` in generation, the
low-noise one the rest (the registry's ``Sampling.boundary``: 0.875 for T2V-A14B, 0.9 for I2V-A14B).
Each is trained on its own part of the schedule. ``--max_timestep_boundary`` and
``--min_timestep_boundary`` keep DiffSynth's meaning: fractions of the *index* into the 1000-step,
shift-5 training schedule, where index 0 is ``t = 1000``. So the boundary itself is not the flag
value: t in [875, 1000] is indices [0, 417), ``--max_timestep_boundary 0.417``. :func:`expert_range`
counts it from the training scheduler.

``--expert high|low`` picks one expert's files from the model flags by their paths (the loader's own
rules: ``high_noise_model/`` folders, diffusers ``transformer_2/``, ComfyUI file names) before
anything is loaded, so the other expert's weights are never read; the loaded DiT's identity is then
checked, and the range derived from its registry entry. Giving ``--expert`` together with a boundary
flag is an error: the flag would silently change what ``--expert`` promises.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import torch

from wan_models import MODELS, ModelSpec, WanDiT
from wan_models import identity as wan_identity
from wan_runtime.model_config import ModelConfig

from .args import EXPERTS, TrainingError

logger = logging.getLogger(__name__)

__all__ = ["EXPERTS", "apply_expert", "config_expert", "expert_range", "expert_spec", "registry_name",
           "select_expert_files"]


def expert_range(expert: str, boundary: float, timesteps: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` timestep boundaries (fractions of the schedule index) of one expert.

    ``timesteps`` is the training schedule (descending from 1000); the high-noise expert gets the
    indices whose ``t >= boundary * 1000`` (the generation rule), the low-noise expert the rest.
    """
    if expert not in EXPERTS:
        raise TrainingError(f"--expert must be one of {EXPERTS}, got {expert!r}")
    steps = len(timesteps)
    high = int((timesteps >= boundary * 1000).sum())
    if not 0 < high < steps:
        raise TrainingError(f"the expert boundary {boundary} leaves no timestep to one of the experts")
    return (0.0, high / steps) if expert == "high" else (high / steps, 1.0)


def config_expert(config: ModelConfig) -> tuple[str | None, list[str]]:
    """The expert one model flag item names (``None``: none, or not a DiT) and the paths/patterns it
    was read from. Local paths and hub file patterns (``high_noise_model/diffusion_*``) both count."""
    items = config.path if config.path is not None else config.origin_file_pattern
    names = [str(item) for item in (items if isinstance(items, list) else [items]) if item]
    experts = {wan_identity.path_expert(Path(name)) for name in names} - {None}
    if len(experts) > 1:
        raise TrainingError(f"the model files {names} mix the high-noise and the low-noise expert in one item; "
                            "give each expert's files as their own item")
    return (experts.pop() if experts else None), names


def select_expert_files(configs: Sequence[ModelConfig], expert: str) -> list[ModelConfig]:
    """``configs`` without the other expert's files (they are never opened). Files of the named expert
    must be among them: only the other expert's is an error naming its files."""
    kept, other = [], []
    for config in configs:
        found, names = config_expert(config)
        (other if found is not None and found != expert else kept).append((config, found, names))
    if other and not any(found == expert for _, found, _ in kept):
        files = ", ".join(name for _, _, names in other for name in names)
        raise TrainingError(f"--expert {expert}: {files} belong(s) to the {other[0][1]}-noise expert, and no file of "
                            f"the {expert}-noise expert is given; add its files ({expert}_noise_model/)")
    for _, found, names in other:
        logger.info("--expert %s: not loading the %s-noise expert's %s", expert, found, ", ".join(names))
    return [config for config, _, _ in kept]


def expert_spec(dit: WanDiT) -> ModelSpec | None:
    """The registry entry of an A14B expert pair whose DiT variant ``dit`` is (None: not an expert)."""
    if dit.config.family != "wan2.2":
        return None
    found = [spec for spec in MODELS.values() if spec.experts and spec.config.variant == dit.config.variant]
    return found[0] if len(found) == 1 else None


def registry_name(dit: WanDiT) -> str | None:
    """The registry model the trained DiT belongs to: by variant for Wan 2.2 (one model each), by the
    exact config for Wan 2.1 (whose variants span sizes; tiny test DiTs match none)."""
    config = dit.config
    if config.family == "wan2.2":
        found = [spec.name for spec in MODELS.values()
                 if spec.family == "wan2.2" and spec.config.variant == config.variant]
    else:
        found = [spec.name for spec in MODELS.values() if spec.config == config]
    return found[0] if len(found) == 1 else None


def _source(dit: WanDiT) -> str:
    return dit.identity.describe() if dit.identity is not None else "no identity recorded"


def apply_expert(args: argparse.Namespace, dit: WanDiT, timesteps: torch.Tensor) -> None:
    """Check the loaded DiT against ``--expert`` and set the boundary flags it implies (the resolved
    flags then record them); without ``--expert``, warn where the flags look like the switch ratio."""
    spec = expert_spec(dit)
    role = dit.identity.expert if dit.identity is not None else None
    if args.expert is None:
        if spec is None:
            return
        ranges = {expert: expert_range(expert, spec.sampling.boundary, timesteps) for expert in EXPERTS}
        for flag in ("max_timestep_boundary", "min_timestep_boundary"):
            if getattr(args, flag) == spec.sampling.boundary:
                meant = role or ("high" if flag == "max_timestep_boundary" else "low")
                low, high = ranges[meant]
                logger.warning("--%s %s is the %s switch ratio (t = %.0f), not a fraction of the schedule index: "
                               "the %s-noise expert's t range is --max_timestep_boundary %.3f "
                               "--min_timestep_boundary %.3f (or pass --expert %s)", flag, getattr(args, flag),
                               spec.name, spec.sampling.boundary * 1000, meant, high, low, meant)
        if role is not None and (args.min_timestep_boundary, args.max_timestep_boundary) == (0.0, 1.0):
            logger.warning("training the %s-noise expert of %s over the whole schedule; it serves only its part "
                           "in generation: pass --expert %s", role, spec.name, role)
        return
    if spec is None:
        raise TrainingError(f"--expert {args.expert}: the loaded {dit.config.variant} DiT ({_source(dit)}) is not an "
                            "expert of a Wan 2.2 A14B pair; --expert applies to Wan2.2-T2V-A14B and Wan2.2-I2V-A14B "
                            "(keep the file in high_noise_model/ or low_noise_model/ so that it reads as one)")
    if role is not None and role != args.expert:
        raise TrainingError(f"--expert {args.expert}: the loaded DiT is the {role}-noise expert ({_source(dit)}); "
                            f"give the {args.expert}-noise expert's files")
    if role is None:
        logger.info("--expert %s: nothing in the paths says which expert the DiT is (%s); training it as the "
                    "%s-noise expert as asked", args.expert, _source(dit), args.expert)
    low, high = expert_range(args.expert, spec.sampling.boundary, timesteps)
    args.min_timestep_boundary, args.max_timestep_boundary = low, high
    logger.info("--expert %s of %s (switch at t = %.0f): timesteps from schedule indices [%d, %d), i.e. "
                "--min_timestep_boundary %.3f --max_timestep_boundary %.3f", args.expert, spec.name,
                spec.sampling.boundary * 1000, round(low * len(timesteps)), round(high * len(timesteps)), low, high)
