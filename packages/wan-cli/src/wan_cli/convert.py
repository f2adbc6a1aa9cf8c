"""``wan convert IN OUT --to FORMAT``: rewrite a checkpoint in the official, diffusers or ComfyUI layout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer

FORMATS = ("official", "diffusers", "comfy")


def convert(
    source: Path = typer.Argument(..., help="Checkpoint file, shard folder or diffusers folder."),
    target: Path = typer.Argument(..., help="Output .safetensors file."),
    to: str = typer.Option(..., "--to", help=f"Target layout: {', '.join(FORMATS)}."),
) -> None:
    """Convert a checkpoint's key layout (weights unchanged; written atomically)."""
    if to not in FORMATS:
        raise typer.BadParameter(f"{to!r} is not one of {', '.join(FORMATS)}", param_hint="--to")
    if target.suffix != ".safetensors":
        raise typer.BadParameter(f"{target} must end in .safetensors", param_hint="TARGET")
    from safetensors.torch import save_file

    import wan_models

    converted = wan_models.convert(wan_models.read_state_dict(source), to=to)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in converted.items()}, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    typer.echo(f"wrote {target} ({to}, {len(converted)} tensors)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
