"""Checkpoint files -> state dict -> network built on ``meta`` -> weights assigned in place.

Tensors come memory-mapped from the files (safetensors, or ``torch.load(mmap=True,
weights_only=True)``) and become the module's parameters directly, so a checkpoint is never held
twice; a dtype or device change converts one tensor at a time. Every file is checked to be whole
(from its header or end record) before it is read, and the weights to be finite as they are placed.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import config_json, formats, integrity
from .detect import Network, detect_network
from .identity import FAMILY_NAMES, Identity, identify
from .errors import CheckpointError
from .integrity import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

logger = logging.getLogger(__name__)

PathLike = str | Path


class NonFiniteWeights(CheckpointError):
    """Weights holding NaN/inf values; ``counts`` maps their keys to how many."""

    def __init__(self, message: str, counts: Mapping[str, int]) -> None:
        super().__init__(message)
        self.counts = dict(counts)


def checkpoint_files(path_or_paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files of one checkpoint: a file, a list of shards, or a folder of ``*.safetensors`` shards.

    A ``config.json`` listed among the shards is left out: it is read from beside them anyway.
    """
    paths = [Path(p) for p in ([path_or_paths] if isinstance(path_or_paths, (str, Path)) else path_or_paths)]
    listed = paths
    paths = [p for p in paths if p.name != config_json.NAME] if len(paths) > 1 else paths
    if not paths:
        raise CheckpointError("no checkpoint file given" + (f" (only {listed[0]})" if listed else ""))
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


def torch_error_message(e: BaseException) -> str:
    """torch's message on one line, without its advice to load with ``weights_only=False`` (which
    would let the file run code) or to allowlist the classes it holds."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    kept = [s for s in sentences if not re.search(r"weights_only|safe_globals|allowlist", s)]
    return " ".join(kept).strip() or type(e).__name__


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    # file_problem has already refused files that are neither a zip archive nor a pickle.
    legacy = integrity.torch_file_kind(path) == "pickle"
    if legacy:
        logger.warning("%s uses the legacy torch.save format, which cannot be memory-mapped; reading it whole", path)
    try:
        data = torch.load(path, map_location="cpu", mmap=not legacy, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = torch_error_message(e)
        # torch names the first class it refuses, but a garbled legacy file can show it a made-up
        # name, and a plain pickle can stop it earlier (at an opcode it lacks): legacy files are read
        # with pickletools for the classes really named.
        foreign = integrity.foreign_globals(path) if legacy else []
        refused = "Unsupported global" in reason
        if foreign or (refused and not legacy):
            detail = ", ".join(foreign[:3]) if foreign else reason
            raise CheckpointError(f"{path}: refused to unpickle: the file holds objects other than tensors, and "
                                  f"loading them could run code ({detail})") from None
        detail = f"{path.stat().st_size:,} bytes" if refused else reason
        raise CheckpointError(f"{path}: not a readable torch checkpoint: corrupt or truncated pickle data "
                              f"({detail})") from None
    except EOFError:
        raise CheckpointError(f"{path}: truncated: its pickle data ends early ({path.stat().st_size:,} bytes)") from None
    except Exception as e:  # torch.load's decoders raise many kinds of error (IndexError, ...) on corrupt data
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({torch_error_message(e)})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def read_state_dict(path_or_paths: PathLike | Sequence[PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (shards merged), memory-mapped rather than copied.

    Each file is first checked from its header or end record (:func:`integrity.file_problem`), so
    a truncated download is reported as such.
    """
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(path_or_paths):
        if path.suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected "
                                  f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")
        try:
            problem = integrity.file_problem(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        part = _read_safetensors(path) if path.suffix in SAFETENSORS_SUFFIXES else _read_pickle(path)
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
    Each placed floating tensor is summed once on its device (no copy, no per-tensor GPU sync); a
    non-finite sum is confirmed by counting, and NaN/inf weights raise :class:`NonFiniteWeights`.
    """
    check_state_dict(module, sd, source)
    sums = {}
    for key in list(sd):
        tensor = sd.pop(key)
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        sd[key] = placed = tensor.to(device=device, dtype=target)
        if placed.is_floating_point():
            sums[key] = integrity.finite_sum(placed)
    if sums:
        flagged = [key for key, ok in zip(sums, torch.isfinite(torch.stack(list(sums.values()))).tolist()) if not ok]
        counts = integrity.non_finite((key, sd[key]) for key in flagged)
        if counts:
            sizes = {key: sd[key].numel() for key in counts}
            raise NonFiniteWeights(f"{source}: {integrity.describe_non_finite(counts, sizes)}", counts)
    module.load_state_dict(sd, strict=True, assign=True)
    sd.clear()
    return module.eval()


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read and recognised: official-key tensors, their network and its config."""

    source: str                       # the file(s), for messages
    format: str                       # "official", "diffusers" or "comfy" as found on disk
    network: Network
    config: Any
    state_dict: dict[str, torch.Tensor]  # official keys, as the network's module names them
    dtype: torch.dtype | None         # what fp8 weights were dequantised to (None: no fp8)
    files: list[Path] = dataclasses.field(default_factory=list)
    identity: Identity | None = None  # a DiT's family and expert role, and what decided them


# What each network is, for errors that say what a file holds and what was asked for.
NETWORK_NAMES = {
    "dit": "a DiT", "vae": "the Wan 2.1 VAE (16 latent channels, Wan2.1_VAE.pth)",
    "vae22": "the Wan 2.2 VAE (48 latent channels, Wan2.2_VAE.pth)", "t5": "the umT5 text encoder",
    "clip": "the CLIP image encoder", "motion_controller": "a speed-control motion controller",
}
# The networks each family's models use (the A14B models keep the Wan 2.1 VAE; no Wan 2.2 model uses CLIP).
FAMILY_NETWORKS = {"wan2.1": ("dit", "vae", "t5", "clip", "motion_controller"), "wan2.2": ("dit", "vae", "vae22", "t5")}


def read_checkpoint(path_or_paths: PathLike | Sequence[PathLike], *, dtype: torch.dtype | None = None,
                    network: str | None = None, family: str | None = None) -> Checkpoint:
    """Read any Wan 2.1 / 2.2 network file (or shards, or a diffusers folder) and recognise what it holds.

    Keys may be official, diffusers or ComfyUI; sizes that shapes cannot show (DiT heads, ...) come
    from a ``config.json`` beside the file. ``network`` makes a file holding another one an error;
    ``family`` ("wan2.1"/"wan2.2") does the same for a DiT of the other family and decides where
    nothing else does (see :mod:`wan_models.identity`).
    """
    if family is not None and family not in FAMILY_NETWORKS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILY_NETWORKS)}")
    files = checkpoint_files(path_or_paths)
    source = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    sd = read_state_dict(files)
    dtype = dtype or formats.upcast_dtype(sd)
    try:
        fmt = formats.detect_format(sd)
        sd = formats.to_official(sd, dtype)
        found = detect_network(sd)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if network is not None and found.name != network:
        raise CheckpointError(f"{source} holds {NETWORK_NAMES.get(found.name, found.name)}, "
                              f"not {NETWORK_NAMES.get(network, network)} as asked for")
    if family is not None and found.name not in FAMILY_NETWORKS[family]:
        raise CheckpointError(f"{source} holds {NETWORK_NAMES[found.name]}, which no {FAMILY_NAMES[family]} "
                              "model uses")
    sd = found.module_keys(sd)
    try:
        config = found.config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    config = config_json.config_for(files, found.name, config, source)
    identity = None
    if found.name == "dit":
        identity = identify(files, config, expected=family, source=source)
        config = dataclasses.replace(config, family=identity.family)
    return Checkpoint(source, fmt, found, config, sd, dtype, files, identity)


def _non_finite_in_files(ckpt: Checkpoint, error: NonFiniteWeights) -> CheckpointError:
    """The file and its own keys behind ``error`` (re-read one tensor at a time), or, when the
    files are finite, the cast to ``ckpt.dtype`` that overflowed."""
    for path in ckpt.files:
        stored = read_state_dict(path)
        counts = integrity.non_finite(stored.items())
        if counts:
            sizes = {key: stored[key].numel() for key in counts}
            return NonFiniteWeights(f"{path}: {integrity.describe_non_finite(counts, sizes)}", counts)
    if ckpt.dtype is None:
        return error
    return NonFiniteWeights(f"{error} after the cast to {ckpt.dtype} (the file's values are finite but beyond "
                            "the range of that dtype)", error.counts)


def load_model(path_or_paths: PathLike | Sequence[PathLike], *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", network: str | None = None,
               family: str | None = None) -> nn.Module:
    """Load any Wan 2.1 / 2.2 network file (or shards, or a diffusers ``transformer/`` or ``vae/`` folder).

    The file may use the official, diffusers or ComfyUI key names; the network is detected from its
    keys. fp8 weights are dequantised to ``dtype`` (default: the dtype of the file's other weights).
    ``network`` ("dit", "vae", "t5", "clip", "motion_controller") makes a file holding another
    network an error instead of a surprise, and ``family`` ("wan2.1"/"wan2.2") a DiT of the other
    family. Weights holding NaN/inf raise :class:`NonFiniteWeights` naming the file, the keys and
    the counts.
    """
    ckpt = read_checkpoint(path_or_paths, dtype=dtype, network=network, family=family)
    with torch.device("meta"):
        module = ckpt.network.module(ckpt.config)
    what = f"{ckpt.config.variant}; {ckpt.identity.describe()}" if ckpt.identity else ckpt.network.name
    logger.info("loading %s (%s) from %s", type(module).__name__, what, ckpt.source)
    if ckpt.identity is not None:
        module.identity = ckpt.identity
    try:
        return load_into(module, ckpt.state_dict, dtype=ckpt.dtype, device=device, source=ckpt.source)
    except NonFiniteWeights as e:
        raise _non_finite_in_files(ckpt, e) from None
