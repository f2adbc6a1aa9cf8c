"""``wan convert IN OUT --to FORMAT``: rewrite a checkpoint in the official, diffusers or ComfyUI layout."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import typer

FORMATS = ("official", "diffusers", "comfy")
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _write_folder(target: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write the files of a model folder so that a failure leaves nothing behind.

    Every file is written in a temporary folder beside ``target``, which then becomes ``target``
    (or, when ``target`` exists, whose files replace those of the same names); on any error the
    temporary folder is removed and ``target`` is as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # usual permissions, unlike tempfile.mkdtemp's owner-only ones
    try:
        for name, write in writers.items():
            write(tmp / name)
        if target.exists():
            for name in writers:
                os.replace(tmp / name, target / name)
            tmp.rmdir()
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_error(target: Path, error: Exception) -> OSError:
    """A one-line error for a failed write, asking about the disk when the system said it is full."""
    if isinstance(error, OSError):
        reason, code = error.strerror or str(error), error.errno
    else:  # SafetensorError: "... I/O error: File too large (os error 27)"; older releases: "IoError(Os {...})"
        text = str(error)
        new = re.search(r"I/O error: (.+?) \(os error (\d+)\)", text)
        old = re.search(r'IoError\(Os \{ code: (\d+),.*message: "([^"]+)"', text)
        reason, code = (new[1], int(new[2])) if new else (old[2], int(old[1])) if old else (text, None)
    return OSError(f"could not write {target}: {reason}" + (" (is the disk full?)" if code in DISK_FULL else ""))


EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")
VAE_FILES = ("Wan2.2_VAE.pth", "Wan2.1_VAE.pth")


def _convert_release(source: Path, target: Path, boundary_ratio: float | None) -> None:
    """A released Wan2.2-A14B folder (``high_noise_model/``, ``low_noise_model/`` and a VAE file)
    -> a diffusers pipeline folder (see :mod:`wan_models.formats.diffusers_pipeline`)."""
    if boundary_ratio is None:
        raise typer.BadParameter(f"{source} holds two experts: give their switch point with --boundary-ratio "
                                 "(0.875 for T2V-A14B, 0.9 for I2V-A14B)", param_hint="--boundary-ratio")
    if target.exists():
        raise typer.BadParameter(f"{target} already exists; a pipeline folder is written new", param_hint="TARGET")
    from wan_models.formats.diffusers_pipeline import write_pipeline
    from wan_models.loading import read_checkpoint

    vae_file = next((source / name for name in VAE_FILES if (source / name).is_file()), None)
    if vae_file is None:
        raise typer.BadParameter(f"{source} has neither {' nor '.join(VAE_FILES)}", param_hint="SOURCE")
    experts = {}
    for role, folder in zip(("high", "low"), EXPERT_FOLDERS):
        ckpt = read_checkpoint(source / folder, network="dit")
        experts[role] = (ckpt.config, ckpt.state_dict)
    vae = read_checkpoint(vae_file)
    if vae.network.name not in ("vae", "vae22"):
        raise typer.BadParameter(f"{vae_file} holds a {vae.network.name} network, not a VAE", param_hint="SOURCE")
    try:
        write_pipeline(target, experts, (vae.config, vae.state_dict), boundary_ratio=boundary_ratio)
    except OSError as e:
        raise _write_error(target, e) from None
    typer.echo(f"wrote {target} (diffusers pipeline: transformer/ = {EXPERT_FOLDERS[0]}, "
               f"transformer_2/ = {EXPERT_FOLDERS[1]}, vae/ = {vae_file.name}, boundary_ratio {boundary_ratio})")


def _is_lora_file(source: Path) -> bool:
    import wan_models

    from .lora_files import is_lora_state

    return is_lora_state(list(wan_models.read_state_dict(source)))


def _convert_lora(source: Path, target: Path, to: str) -> None:
    """A LoRA file -> the same LoRA in layout ``to`` (always one .safetensors file), same strength."""
    from safetensors import SafetensorError

    from .lora_files import convert_lora

    if target.suffix != ".safetensors":
        raise typer.BadParameter(f"{target} must end in .safetensors (a LoRA is one file in every layout)",
                                 param_hint="TARGET")
    try:
        summary = convert_lora(source, target, to)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="SOURCE") from None
    except (SafetensorError, OSError) as e:
        raise _write_error(target, e) from None
    typer.echo(f"wrote {target} ({to} LoRA: {summary})")


def convert(
    source: Path = typer.Argument(..., help="Checkpoint file, shard folder, diffusers folder, a released "
                                            "Wan2.2-A14B folder (with --to diffusers), or a LoRA file."),
    target: Path = typer.Argument(..., help="Output .safetensors file (official, comfy) or folder (diffusers)."),
    to: str = typer.Option(..., "--to", help=f"Target layout: {', '.join(FORMATS)}."),
    boundary_ratio: float = typer.Option(None, "--boundary-ratio", min=0.0, max=1.0,
                                         help="Expert switch point of a released A14B folder (0.875 T2V, 0.9 I2V)."),
) -> None:
    """Convert a checkpoint's key layout (weights unchanged; written atomically).

    diffusers output is a model folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``
    (a ``transformer/`` folder for a Wan 2.1 or 2.2 DiT, a ``vae/`` folder for either VAE; the
    Wan 2.2 VAE's config says ``is_residual``).
    A released Wan2.2-A14B folder (``high_noise_model/``, ``low_noise_model/``, the VAE file) becomes
    a diffusers pipeline folder with ``model_index.json``; its ``--boundary-ratio`` must be given.
    A LoRA file becomes one ``.safetensors`` file in the layout asked for (``official``: release names with
    ``lora_A``/``lora_B``; ``diffusers``; ``comfy``), at the same strength, with its ``wan.base`` /
    ``wan.training_args`` header kept.
    A failed write (e.g. a full disk) leaves no partial file or folder behind.
    """
    if to not in FORMATS:
        raise typer.BadParameter(f"{to!r} is not one of {', '.join(FORMATS)}", param_hint="--to")
    if source.is_dir() and all((source / folder).is_dir() for folder in EXPERT_FOLDERS):
        if to != "diffusers":
            raise typer.BadParameter(f"{source} is a two-expert release; only --to diffusers converts it whole "
                                     f"(convert {EXPERT_FOLDERS[0]}/ and {EXPERT_FOLDERS[1]}/ one at a time)",
                                     param_hint="--to")
        _convert_release(source, target, boundary_ratio)
        return
    if source.is_file() and _is_lora_file(source):
        _convert_lora(source, target, to)
        return
    if to != "diffusers" and target.suffix != ".safetensors":
        raise typer.BadParameter(f"{target} must end in .safetensors", param_hint="TARGET")
    if to == "diffusers" and (target.suffix or target.is_file()):
        raise typer.BadParameter(f"diffusers output is a folder; {target} looks like a file", param_hint="TARGET")
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    import wan_models
    from wan_models.formats import diffusers as diffusers_format
    from wan_models.loading import read_checkpoint
    from wan_runtime.files import atomic_path

    ckpt = read_checkpoint(source)
    converted = {k: v.contiguous() for k, v in wan_models.convert(ckpt.state_dict, to=to).items()}
    try:
        if to == "diffusers":
            make_config = {"dit": diffusers_format.transformer_config, "vae": diffusers_format.vae_config,
                           "vae22": diffusers_format.vae_config}  # vae_config tells the two VAEs apart
            if ckpt.network.name not in make_config:
                raise ValueError(f"diffusers has no layout for a {ckpt.network.name} network (only dit, vae, vae22)")
            config = make_config[ckpt.network.name](ckpt.config)
            _write_folder(target, {"diffusion_pytorch_model.safetensors": lambda p: save_file(converted, str(p)),
                                   "config.json": lambda p: p.write_text(json.dumps(config, indent=2))})
        else:
            with atomic_path(target) as tmp:
                save_file(converted, str(tmp))
    except (SafetensorError, OSError) as e:
        raise _write_error(target, e) from None
    typer.echo(f"wrote {target} ({to}, {len(converted)} tensors)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
