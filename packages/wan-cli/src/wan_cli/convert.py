"""``wan convert IN OUT --to FORMAT``: rewrite a checkpoint in the official, diffusers or ComfyUI layout."""

from __future__ import annotations

import json
from pathlib import Path

import typer

FORMATS = ("official", "diffusers", "comfy")


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
    from wan_runtime.files import atomic_path

    ckpt = read_checkpoint(source)
    converted = {k: v.contiguous() for k, v in wan_models.convert(ckpt.state_dict, to=to).items()}
    if to == "diffusers":
        make_config = {"dit": diffusers_format.transformer_config, "vae": diffusers_format.vae_config}
        if ckpt.network.name not in make_config:
            raise ValueError(f"diffusers has no layout for a {ckpt.network.name} network (only dit, vae)")
        config = make_config[ckpt.network.name](ckpt.config)
        with atomic_path(target / "diffusion_pytorch_model.safetensors") as tmp:
            save_file(converted, str(tmp))
        with atomic_path(target / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
    else:
        with atomic_path(target) as tmp:
            save_file(converted, str(tmp))
    typer.echo(f"wrote {target} ({to}, {len(converted)} tensors)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
