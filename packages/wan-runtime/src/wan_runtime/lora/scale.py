"""Where a LoRA file keeps its strength ``alpha / rank``, and reading it.

A layer's factor ``alpha / rank`` is taken from the first of these that the file has:

1. an ``<layer>.alpha`` tensor (kohya, ComfyUI, musubi, DiffSynth exports); it wins over a header,
   because it is per layer and is what those tools read; a header that says otherwise is logged;
2. diffusers' safetensors header ``lora_adapter_metadata`` (the adapter's ``LoraConfig`` as JSON,
   its keys prefixed ``transformer.`` when a pipeline saved it), or a peft folder's
   ``adapter_config.json``: ``lora_alpha`` and ``r``, per layer ``alpha_pattern`` /
   ``rank_pattern`` (matched as peft matches them), and ``use_rslora`` (``alpha / sqrt(rank)``);
3. our trainer's header ``lora_alpha`` / ``lora_rank`` (one value for every layer).

Without any of them the factor is 1 (alpha = rank, the convention of peft and diffusers). The rank
is always the tensors' own; a header rank that differs is an error naming the layer and both ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

DIFFUSERS_KEY = "lora_adapter_metadata"  # diffusers' header key (diffusers.loaders.lora_base)
DIFFUSERS_PREFIX = "transformer."  # what a diffusers pipeline puts before the transformer's config keys
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Leading parts of a file's layer name that are no module name of the adapted model itself.
_WRAPPERS = ("base_model.model.", "transformer.")


@dataclass(frozen=True)
class HeaderScale:
    """A LoRA's alpha and rank as a header or config declares them (peft's ``LoraConfig`` fields)."""

    origin: str  # e.g. "header lora_adapter_metadata", for messages
    alpha: float | None = None
    rank: int | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    rslora: bool = False

    def alpha_for(self, layer: str) -> float | None:
        """The alpha the header gives ``layer`` (a name in the file's own naming)."""
        return _by_pattern(self.alpha_pattern, _module_name(layer), self.alpha)

    def rank_for(self, layer: str) -> int | None:
        """The rank the header gives ``layer``."""
        return _by_pattern(self.rank_pattern, _module_name(layer), self.rank)


def _module_name(layer: str) -> str:
    for prefix in _WRAPPERS:
        layer = layer.removeprefix(prefix)
    return layer


def _by_pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's rule (``peft.utils.other.get_pattern_key``): the first pattern ``p`` in order for which
    ``(.*\\.)?(p)$`` matches the module name gives the value; else the global one."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def layer_scale(layer: str, rank: int, tensor_alpha: float | None, header: HeaderScale | None,
                source: str) -> float:
    """``alpha / rank`` of one layer (``alpha / sqrt(rank)`` under rsLoRA); see the module docstring.

    Raises ``ValueError`` when the header's rank for ``layer`` is not the tensors' ``rank``."""
    header_alpha = None
    if header is not None:
        header_rank = header.rank_for(layer)
        if header_rank is not None and header_rank != rank:
            raise ValueError(f"{source}: layer {layer!r} has rank {rank} in its tensors but rank {header_rank} "
                             f"in {header.origin}; the file is inconsistent (edited or converted wrongly)")
        header_alpha = header.alpha_for(layer)
    if tensor_alpha is not None:
        if header_alpha is not None and not math.isclose(header_alpha, tensor_alpha, rel_tol=1e-6):
            logger.warning("%s: layer %r: its .alpha tensor says %g, %s says %g; using the tensor", source,
                           layer, tensor_alpha, header.origin, header_alpha)
        return tensor_alpha / rank
    if header_alpha is None:
        return 1.0
    return header_alpha / (math.sqrt(rank) if header.rslora else rank)


def _config_scale(config: Mapping[str, Any], origin: str, source: str) -> HeaderScale:
    """A ``LoraConfig`` as a dict (diffusers' header or peft's adapter_config.json) -> HeaderScale."""
    def number(key: str, kind: type) -> Any:
        value = config.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{source}: {origin} has {key}={value!r}; expected a positive number")
        return kind(value)

    patterns = {}
    for key, kind in (("alpha_pattern", float), ("rank_pattern", int)):
        value = config.get(key) or {}
        if not isinstance(value, Mapping) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()):
            raise ValueError(f"{source}: {origin} has {key}={value!r}; expected a mapping of layer patterns "
                             f"to positive numbers")
        patterns[key] = {str(k): kind(v) for k, v in value.items()}
    return HeaderScale(origin, number("lora_alpha", float), number("r", int), patterns["alpha_pattern"],
                       patterns["rank_pattern"], bool(config.get("use_rslora", False)))


def header_scale(header: Mapping[str, str], source: str) -> HeaderScale | None:
    """The scale a safetensors header declares: diffusers' ``lora_adapter_metadata`` first, else our
    trainer's ``lora_alpha`` / ``lora_rank``; ``None`` when it declares none."""
    if DIFFUSERS_KEY in header:
        try:
            config = json.loads(header[DIFFUSERS_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: header {DIFFUSERS_KEY} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{source}: header {DIFFUSERS_KEY} is not a JSON object")
        if any(key.startswith(DIFFUSERS_PREFIX) for key in config):  # saved by a pipeline
            config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in config.items() if k.startswith(DIFFUSERS_PREFIX)}
        return _config_scale(config, f"header {DIFFUSERS_KEY}", source)
    if "lora_alpha" in header:
        config = {}
        for key, name in (("lora_alpha", "lora_alpha"), ("r", "lora_rank")):
            if name in header:
                try:
                    config[key] = float(header[name])
                except ValueError:
                    raise ValueError(f"{source}: header {name}={header[name]!r} is not a number") from None
        if "r" in config and not config["r"].is_integer():
            raise ValueError(f"{source}: header lora_rank={header['lora_rank']!r} is not a whole number")
        return _config_scale(config, "header lora_alpha/lora_rank", source)
    return None


@dataclass(frozen=True)
class LoraFile:
    """Where a LoRA's tensors are, its safetensors header and the scale it declares."""

    weights: Path
    header: dict[str, str]
    scale: HeaderScale | None


def locate(path: str | os.PathLike) -> LoraFile:
    """Resolve a LoRA path: a file, or a peft adapter folder (``adapter_model.safetensors`` with
    ``adapter_config.json``; the weights file of such a folder reads the config beside it too)."""
    path = Path(path)
    config_path = None
    if path.is_dir():
        weights = [path / name for name in PEFT_WEIGHTS if (path / name).is_file()]
        if not (path / PEFT_CONFIG).is_file() or not weights:
            raise ValueError(f"{path} is a folder but not a peft adapter folder: expected {PEFT_CONFIG} and one "
                             f"of {', '.join(PEFT_WEIGHTS)} in it")
        path, config_path = weights[0], path / PEFT_CONFIG
    elif path.name in PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        config_path = path.parent / PEFT_CONFIG
    header = read_header(path)
    scale = header_scale(header, os.fspath(path))
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path}: cannot be read as JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: not a JSON object")
        scale = _config_scale(config, os.fspath(config_path), os.fspath(path))
    return LoraFile(path, header, scale)


def read_header(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` for other files or none)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError):  # a damaged file: read_state_dict reports it with the reason
        return {}
