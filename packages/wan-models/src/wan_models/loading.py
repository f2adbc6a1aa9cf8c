"""Checkpoint files -> state dict -> network built on ``meta`` -> weights assigned in place.

Tensors come memory-mapped from the files (safetensors, or ``torch.load(mmap=True,
weights_only=True)``) and become the module's parameters directly, so a checkpoint is never held
twice; a dtype or device change converts one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import formats
from .detect import Network, detect_network

logger = logging.getLogger(__name__)

PathLike = str | Path
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the network asked for."""


def checkpoint_files(path_or_paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files of one checkpoint: a file, a list of shards, or a folder of ``*.safetensors`` shards."""
    paths = [Path(p) for p in ([path_or_paths] if isinstance(path_or_paths, (str, Path)) else path_or_paths)]
    if not paths:
        raise CheckpointError("no checkpoint file given")
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{path} is a folder without any .safetensors file")
            files.extend(shards)
        elif not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        else:
            files.append(path)
    return files


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            logger.warning("%s uses the legacy torch.save format, which cannot be memory-mapped; "
                           "reading it whole", path)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused to unpickle; the file holds more than tensors, which could run "
                              f"code ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def read_state_dict(path_or_paths: PathLike | Sequence[PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (shards merged), memory-mapped rather than copied."""
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(path_or_paths):
        if path.suffix in SAFETENSORS_SUFFIXES:
            part = _read_safetensors(path)
        elif path.suffix in PICKLE_SUFFIXES:
            part = _read_pickle(path)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected "
                                  f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")
        clash = state.keys() & part.keys()
        if clash:
            raise CheckpointError(f"{path}: keys also present in another shard, e.g. {sorted(clash)[:3]}")
        state.update(part)
    return state


def _listing(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing missing and unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected.keys() & sd.keys() if sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {'; '.join(sorted(wrong)[:10])}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + " | ".join(problems))


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", source: str = "checkpoint") -> nn.Module:
    """Assign ``sd`` (strictly checked) as the parameters of a ``meta``-built ``module``.

    Floating tensors are cast to ``dtype`` when given; ``sd`` is emptied as tensors move into place.
    """
    check_state_dict(module, sd, source)
    for key in list(sd):
        tensor = sd.pop(key)
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        sd[key] = tensor.to(device=device, dtype=target)
    module.load_state_dict(sd, strict=True, assign=True)
    sd.clear()
    return module.eval()


def _config_json(files: list[Path]) -> dict[str, Any]:
    """The ``config.json`` beside a checkpoint (official DiT or diffusers), when there is one."""
    path = files[0].parent / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read and recognised: official-key tensors, their network and its config."""

    source: str                       # the file(s), for messages
    format: str                       # "official", "diffusers" or "comfy" as found on disk
    network: Network
    config: Any
    state_dict: dict[str, torch.Tensor]  # official keys, as the network's module names them
    dtype: torch.dtype | None         # what fp8 weights were dequantised to (None: no fp8)


def read_checkpoint(path_or_paths: PathLike | Sequence[PathLike], *, dtype: torch.dtype | None = None,
                    network: str | None = None) -> Checkpoint:
    """Read any Wan 2.1 network file (or shards, or a diffusers folder) and recognise what it holds.

    Keys may be official, diffusers or ComfyUI; sizes that shapes cannot show (DiT heads, ...) come
    from a ``config.json`` beside the file. ``network`` makes a file holding another one an error.
    """
    files = checkpoint_files(path_or_paths)
    source = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    sd = read_state_dict(files)
    dtype = dtype or formats.upcast_dtype(sd)
    try:
        fmt = formats.detect_format(sd)
        sd = formats.to_official(sd, dtype)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    found = detect_network(sd)
    if network is not None and found.name != network:
        raise CheckpointError(f"{source} holds a {found.name} network, not the {network} asked for")
    sd = found.module_keys(sd)
    config_json = _config_json(files)
    from_diffusers = formats.diffusers.is_diffusers_config(config_json)
    hints = {}
    if found.name == "dit" and not from_diffusers:
        hints = {k: config_json[k] for k in ("num_heads", "text_len") if k in config_json}
    config = found.config_from_state_dict(sd, **hints)
    if from_diffusers:
        config = dataclasses.replace(config, **formats.diffusers.config_fields(config_json, found.name))
    return Checkpoint(source, fmt, found, config, sd, dtype)


def load_model(path_or_paths: PathLike | Sequence[PathLike], *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", network: str | None = None) -> nn.Module:
    """Load any Wan 2.1 network file (or shards, or a diffusers ``transformer/`` or ``vae/`` folder).

    The file may use the official, diffusers or ComfyUI key names; the network is detected from its
    keys. fp8 weights are dequantised to ``dtype`` (default: the dtype of the file's other weights).
    ``network`` ("dit", "vae", "t5", "clip", "motion_controller") makes a file holding another
    network an error instead of a surprise.
    """
    ckpt = read_checkpoint(path_or_paths, dtype=dtype, network=network)
    with torch.device("meta"):
        module = ckpt.network.module(ckpt.config)
    logger.info("loading %s (%s) from %s", type(module).__name__,
                getattr(ckpt.config, "variant", ckpt.network.name), ckpt.source)
    return load_into(module, ckpt.state_dict, dtype=ckpt.dtype, device=device, source=ckpt.source)
