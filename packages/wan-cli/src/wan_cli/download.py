"""``wan download``: fetch exactly the files a registry model needs (resumable: whole files stay)."""

from __future__ import annotations

from pathlib import Path

import typer


def _with_checksum(folder: Path, paths: list[Path]) -> tuple[int, int]:
    """How many of the files at ``paths`` (folders expanded) the manifest of ``folder`` gives a sha256 for, of all."""
    from wan_runtime import manifest

    entries = manifest.read(folder)
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    known = [f for f in files if (entry := entries.get(f.relative_to(folder).as_posix())) and entry.sha256]
    return len(known), len(files)


def download(
    model: str = typer.Argument(..., help="Registry name, e.g. Wan2.1-T2V-1.3B (see `wan models`)."),
    local_dir: Path = typer.Option(Path("models"), "--local-dir", help="Models folder (files go to <dir>/<model id>/)."),
    verify: bool = typer.Option(False, "--verify", help="Also compare each file's sha256 with the hub's "
                                "(reads every byte; without it, sizes and headers are checked)."),
    source: str | None = typer.Option(None, "--source", help="Hub to download from: modelscope or huggingface "
                                      "(hf); default $DIFFSYNTH_DOWNLOAD_SOURCE, else modelscope."),
) -> None:
    """Download a model's files from ModelScope or the Hugging Face Hub into the models folder.

    Files already there are kept when whole; a file cut short (size differs from the hub's, or its
    header or end record is missing) is fetched again.
    """
    from wan_runtime.model_config import redirect_common_files

    from wan_runtime.sources import registry_source

    try:
        files = registry_source(model, source)
    except ValueError as e:  # an unknown --source (or $DIFFSYNTH_DOWNLOAD_SOURCE) value
        raise typer.BadParameter(str(e), param_hint="--source") from None
    hashed = total = 0
    for config in redirect_common_files(files.model_configs) + [files.tokenizer_config]:
        paths = config.resolve(str(local_dir), verify=verify)
        for path in paths:
            typer.echo(f"ok  {path}")
        if verify:
            known, count = _with_checksum(local_dir.absolute() / config.model_id, paths)
            hashed, total = hashed + known, total + count
    checked = ""
    if verify:
        checked = f" (sha256 verified for {hashed} of {total} files"
        checked += "; no hub checksum on record for the others: size and header checked)" if hashed < total else ")"
    typer.echo(f"{model} is complete under {local_dir.absolute()}{checked}")


def register(app: typer.Typer) -> None:
    app.command("download")(download)
