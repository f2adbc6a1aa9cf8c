"""diffusers' Wan pipeline folders (``model_index.json`` + one subfolder per component): read and write.

A ``*-Diffusers`` Wan 2.2 folder names its parts in ``model_index.json``: ``transformer`` (the
high-noise expert of the A14B models, or the single DiT of TI2V-5B), ``transformer_2`` (the
low-noise expert; null without one), ``vae``, the switch point ``boundary_ratio`` (a fraction of
the training timesteps; null with one DiT) and ``expand_timesteps`` (TI2V-5B's per-token
timesteps). :func:`read_pipeline` turns that into a :class:`PipelineFolder` of paths that
:func:`wan_models.load_model` loads; :func:`write_pipeline` writes one from official state dicts.

Only the DiTs and the VAE are written (and listed in ``model_index.json``): the text encoder and
tokenizer are transformers' umT5 layout, which this project does not ship, and the scheduler is
the caller's choice. Pass them to ``WanPipeline.from_pretrained(folder, text_encoder=...,
tokenizer=..., scheduler=...)``; each written component also loads on its own with
``WanTransformer3DModel.from_pretrained(folder, subfolder="transformer_2")`` and the like.
This module never imports diffusers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config_json import NAME as CONFIG_NAME
from ..config_json import read as read_json
from ..dit_config import DiTConfig
from ..errors import CheckpointError
from ..vae import VAEConfig
from . import diffusers

logger = logging.getLogger(__name__)

__all__ = ["EXPERT_FOLDERS", "MODEL_INDEX", "PipelineFolder", "WEIGHTS_NAME", "read_pipeline", "write_pipeline"]

MODEL_INDEX = "model_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The model_index.json key (and subfolder) of each expert role; "single" is a pipeline with one DiT.
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2", "single": "transformer"}
_COMPONENT_CLASSES = {"transformer": diffusers.TRANSFORMER_CLASSES, "transformer_2": diffusers.TRANSFORMER_CLASSES,
                      "vae": diffusers.VAE_CLASSES}


@dataclass(frozen=True)
class PipelineFolder:
    """What a diffusers Wan pipeline folder holds, as paths to load.

    ``experts`` maps "high" and "low" (two experts) or "single" (one DiT) to a transformer folder
    (``config.json`` + weights); ``vae`` is the VAE folder, None when the index has none.
    """

    root: Path
    pipeline_class: str
    experts: dict[str, Path]
    vae: Path | None
    boundary_ratio: float | None
    expand_timesteps: bool


def _component(path: Path, index: Mapping[str, Any], key: str) -> str | None:
    """The class name of ``index[key]`` (``["diffusers", class]``), or None for a missing or null entry."""
    entry = index.get(key)
    if entry is None or entry == [None, None]:
        return None
    allowed = _COMPONENT_CLASSES[key]
    if (not isinstance(entry, list) or len(entry) != 2 or entry[0] != "diffusers"
            or entry[1] not in allowed):
        raise CheckpointError(f'{path}: "{key}" must be ["diffusers", one of {", ".join(allowed)}] or null, '
                              f"got {json.dumps(entry)}")
    folder = path.parent / key
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f'{path}: "{key}" names {entry[1]}, but {folder / CONFIG_NAME} does not exist')
    return entry[1]


def read_pipeline(folder: str | Path) -> PipelineFolder:
    """Read a diffusers Wan pipeline folder's ``model_index.json``.

    Raises :class:`CheckpointError` naming the file and the key when the index is malformed: no
    ``transformer``, an entry that is not a diffusers Wan class, a subfolder without ``config.json``,
    two experts without a ``boundary_ratio`` in (0, 1) (or a boundary with one DiT), or a
    non-boolean ``expand_timesteps``.
    """
    root = Path(folder)
    path = root / MODEL_INDEX
    if not path.is_file():
        raise CheckpointError(f"{root}: not a diffusers pipeline folder (no {MODEL_INDEX})")
    index = read_json(path)
    name = index.get("_class_name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f'{path}: "_class_name" must name the pipeline class, got {json.dumps(name)}')
    if _component(path, index, "transformer") is None:
        raise CheckpointError(f'{path}: "transformer" is missing or null; a Wan pipeline needs one')
    two = _component(path, index, "transformer_2") is not None
    vae = root / "vae" if _component(path, index, "vae") is not None else None
    boundary = index.get("boundary_ratio")
    if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float))
                                 or not math.isfinite(boundary) or not 0 < boundary < 1):
        raise CheckpointError(f'{path}: "boundary_ratio" must be a number between 0 and 1 or null, '
                              f"got {json.dumps(boundary)}")
    if two and boundary is None:
        raise CheckpointError(f'{path}: "transformer_2" is set but "boundary_ratio" is null; the switch '
                              "between the high- and low-noise experts needs it")
    if not two and boundary is not None:
        raise CheckpointError(f'{path}: "boundary_ratio" is {boundary} but "transformer_2" is missing or null; '
                              "a boundary needs two experts")
    expand = index.get("expand_timesteps", False)
    if not isinstance(expand, bool):
        raise CheckpointError(f'{path}: "expand_timesteps" must be true or false, got {json.dumps(expand)}')
    experts = ({"high": root / "transformer", "low": root / "transformer_2"} if two
               else {"single": root / "transformer"})
    return PipelineFolder(root, name, experts, vae, None if boundary is None else float(boundary), expand)


def _save_component(folder: Path, config: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    weights = {k: v.contiguous() for k, v in diffusers.from_official(state_dict).items()}
    save_file(weights, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_pipeline(target: str | Path, experts: Mapping[str, tuple[DiTConfig, Mapping[str, torch.Tensor]]],
                   vae: tuple[VAEConfig, Mapping[str, torch.Tensor]] | None = None, *,
                   boundary_ratio: float | None = None, expand_timesteps: bool = False,
                   pipeline_class: str = "WanPipeline") -> Path:
    """Write a diffusers pipeline folder from official-key state dicts and their configs.

    ``experts`` is ``{"high": (config, sd), "low": (config, sd)}`` (``boundary_ratio`` in (0, 1)
    required) or ``{"single": (config, sd)}`` (no boundary); ``vae`` a Wan 2.1 or 2.2 VAE. Writes
    ``model_index.json`` listing only these parts (see the module docstring) and ``transformer/``,
    ``transformer_2/``, ``vae/`` with ``config.json`` + ``diffusion_pytorch_model.safetensors``.
    Everything is written in a temporary folder beside ``target`` that is then renamed to it; on
    any error the temporary folder is removed. ``target`` must not exist yet.
    """
    target = Path(target)
    roles = set(experts)
    if roles not in ({"high", "low"}, {"single"}):
        raise ValueError(f"experts must be {{'high', 'low'}} or {{'single'}}, got {sorted(roles)}")
    if roles == {"high", "low"} and (boundary_ratio is None or not 0 < boundary_ratio < 1):
        raise ValueError(f"two experts need a boundary_ratio between 0 and 1, got {boundary_ratio!r}")
    if roles == {"single"} and boundary_ratio is not None:
        raise ValueError(f"boundary_ratio {boundary_ratio} needs two experts (high and low)")
    if target.exists():
        raise FileExistsError(f"{target} already exists; write_pipeline makes a new folder")
    configs = {EXPERT_FOLDERS[role]: diffusers.transformer_config(config) for role, (config, _) in experts.items()}
    index: dict[str, Any] = {"_class_name": pipeline_class, "boundary_ratio": boundary_ratio,
                             "expand_timesteps": expand_timesteps}
    for key, config in configs.items():
        index[key] = ["diffusers", config["_class_name"]]
    if "transformer_2" not in index:
        index["transformer_2"] = [None, None]
    vae_json = diffusers.vae_config(vae[0]) if vae is not None else None
    if vae_json is not None:
        index["vae"] = ["diffusers", vae_json["_class_name"]]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        for role, (_, state_dict) in experts.items():
            key = EXPERT_FOLDERS[role]
            _save_component(tmp / key, configs[key], state_dict)
        if vae is not None and vae_json is not None:
            _save_component(tmp / "vae", vae_json, vae[1])
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote diffusers %s folder %s (%s)", pipeline_class, target, ", ".join(sorted(index)))
    return target
