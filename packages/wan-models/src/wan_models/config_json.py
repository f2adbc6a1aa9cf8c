"""The ``config.json`` beside a checkpoint: read, checked and applied to the config from the shapes.

An official DiT folder's ``config.json`` (the ``WanModel`` kwargs) states ``num_heads`` and
``text_len``, which shapes cannot show; a diffusers folder's states a DiT's heads, eps and VACE
layers (and, where its channels tell, the Wan 2.2 family) or a Wan 2.1 / 2.2 VAE's latent
statistics; a VAE config.json of the other Wan VAE than the weights is an error. Every error is a
:class:`CheckpointError` naming the file and the key at fault.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CheckpointError
from .formats import diffusers

NAME = "config.json"
OFFICIAL_DIT_KEYS = ("num_heads", "text_len")
# Networks whose checkpoints may take sizes from a config.json (the others never read one).
CONFIGURED_NETWORKS = ("dit", "vae", "vae22")


class Field(NamedTuple):
    """One config field a config.json sets: its key there, its value as written and as converted."""

    key: str
    raw: Any
    value: Any


def read(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`CheckpointError` with line and column when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON: not UTF-8 text") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def fields(path: Path, data: dict[str, Any], network: str) -> dict[str, Field]:
    """The config fields (by name) that ``data``, read from ``path``, sets for a ``network`` checkpoint."""
    if diffusers.is_diffusers_config(data):
        try:
            values = diffusers.config_fields(data, network)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return {name: Field(diffusers.CONFIG_KEYS[name], data[diffusers.CONFIG_KEYS[name]], value)
                for name, value in values.items()}
    if network != "dit":
        return {}
    out = {}
    for key in OFFICIAL_DIT_KEYS:
        if key in data:
            try:
                out[key] = Field(key, data[key], diffusers.positive_int(data[key]))
            except ValueError:
                raise CheckpointError(f'{path}: "{key}" must be a positive integer, got {json.dumps(data[key])}') from None
    return out


def _fits(config: Any, name: str, value: Any) -> bool:
    try:
        dataclasses.replace(config, **{name: value})
    except (ValueError, TypeError):
        return False
    return True


def apply(config: Any, config_fields: dict[str, Field], path: Path, source: str) -> Any:
    """``config`` with ``config_fields`` set; a :class:`CheckpointError` naming the file and the
    key(s) whose values do not fit the weights in ``source``."""
    try:
        return dataclasses.replace(config, **{name: f.value for name, f in config_fields.items()})
    except (ValueError, TypeError) as e:
        bad = [name for name, f in config_fields.items() if not _fits(config, name, f.value)] or list(config_fields)
        listed = ", ".join(f'"{config_fields[name].key}": {json.dumps(config_fields[name].raw)}' for name in bad)
        verb = "does" if len(bad) == 1 else "do"
        raise CheckpointError(f"{path}: {listed} {verb} not fit the weights of {source} ({e})") from None


def config_for(files: list[Path], network: str, config: Any, source: str) -> Any:
    """``config`` (from the shapes) completed by the ``config.json`` beside ``files``, if there is one."""
    path = files[0].parent / NAME
    if network not in CONFIGURED_NETWORKS or not path.is_file():
        return config
    config_fields = fields(path, read(path), network)
    return apply(config, config_fields, path, source) if config_fields else config
