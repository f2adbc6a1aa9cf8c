"""Shared option parsing: torch dtypes and devices by name, TOML config files."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import typer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    return getattr(torch, name)


def finite(ctx: typer.Context, param: typer.CallbackParam, value: float | None) -> float | None:
    """Option callback: ``nan`` and ``inf`` parse as floats but are never a meaningful setting."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number", param_hint="--" + param.name.replace("_", "-"))
    return value


def key_values(values: list[str], flag: str) -> dict[str, Any]:
    """Repeatable ``KEY=VALUE`` flags as a dict (the last of a repeated key wins); values that look like
    numbers, ``true``/``false`` or comma-separated lists of them become those."""
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=flag)
        parsed[key.strip()] = _value(value.strip())
    return parsed


def _value(text: str) -> Any:
    """``text`` as an int, float, bool or list of them where it reads as one; else the text itself."""
    if "," in text:
        return [_value(part.strip()) for part in text.split(",")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(ctx: typer.Context, _param: typer.CallbackParam, path: Path | None) -> Path | None:
    """Eager ``--config`` callback: TOML keys (flag names with - or _) become option defaults."""
    if path is None:
        return None
    try:
        data: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path}: {e}", param_hint="--config") from None
    known = {p.name for p in ctx.command.params}
    defaults = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise typer.BadParameter(f"{path} sets unknown options {unknown}", param_hint="--config")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path
