"""``wan download``: fetch exactly the files a registry model needs (resumable: present files stay)."""

from __future__ import annotations

from pathlib import Path

import typer


def download(
    model: str = typer.Argument(..., help="Registry name, e.g. Wan2.1-T2V-1.3B (see `wan models`)."),
    local_dir: Path = typer.Option(Path("models"), "--local-dir", help="Models folder (files go to <dir>/<model id>/)."),
) -> None:
    """Download a model's files from ModelScope into the models folder."""
    from wan_runtime.model_config import redirect_common_files

    from .model_source import registry_source

    source = registry_source(model)
    for config in redirect_common_files(source.model_configs) + [source.tokenizer_config]:
        for path in config.resolve(str(local_dir)):
            typer.echo(f"ok  {path}")
    typer.echo(f"{model} is complete under {local_dir.absolute()}")


def register(app: typer.Typer) -> None:
    app.command("download")(download)
