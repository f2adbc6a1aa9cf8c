"""``wan convert IN OUT --to FORMAT``: rewrite a checkpoint in the official, diffusers or ComfyUI layout."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer

FORMATS = ("official", "diffusers", "comfy")


def _write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename into ``path``: ``path`` is whole or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(
    source: Path = typer.Argument(..., help="Checkpoint file, shard folder or diffusers folder."),
    target: Path = typer.Argument(..., help="Output .safetensors file (official, comfy) or folder (diffusers)."),
    to: str = typer.Option(..., "--to", help=f"Target layout: {', '.join(FORMATS)}."),
) -> None:
    """Convert a checkpoint's key layout (weights unchanged; written atomically).

    diffusers output is a model folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``.
    """
    if to not in FORMATS:
        raise typer.BadParameter(f"{to!r} is not one of {', '.join(FORMATS)}", param_hint="--to")
    if to != "diffusers" and target.suffix != ".safetensors":
        raise typer.BadParameter(f"{target} must end in .safetensors", param_hint="TARGET")
    if to == "diffusers" and target.suffix:
        raise typer.BadParameter(f"diffusers output is a folder; {target} looks like a file", param_hint="TARGET")
    from safetensors.torch import save_file

    import wan_models
    from wan_models.formats import diffusers as diffusers_format
    from wan_models.loading import read_checkpoint

    ckpt = read_checkpoint(source)
    converted = {k: v.contiguous() for k, v in wan_models.convert(ckpt.state_dict, to=to).items()}
    if to == "diffusers":
        make_config = {"dit": diffusers_format.transformer_config, "vae": diffusers_format.vae_config}
        if ckpt.network.name not in make_config:
            raise ValueError(f"diffusers has no layout for a {ckpt.network.name} network (only dit, vae)")
        config = make_config[ckpt.network.name](ckpt.config)
        _write_atomically(target / "diffusion_pytorch_model.safetensors", lambda p: save_file(converted, p))
        _write_atomically(target / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    else:
        _write_atomically(target, lambda p: save_file(converted, p))
    typer.echo(f"wrote {target} ({to}, {len(converted)} tensors)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
