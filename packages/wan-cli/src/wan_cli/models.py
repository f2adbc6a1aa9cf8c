"""``wan models``: the registry as a table, with which files are present locally, and whole."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from wan_runtime.model_config import COMMON_FILES, missing_files

DEFAULT_DIR = Path("models")


def _status(local_dir: Path, model_id: str, pattern: str, notes: dict[str, str]) -> str:
    """``+`` whole, ``!`` there but incomplete (why goes to ``notes``), ``-`` missing."""
    repo = COMMON_FILES.get(pattern, model_id)
    missing = missing_files(local_dir.absolute() / repo, [pattern])
    if pattern not in missing:
        return "+"
    if not missing[pattern]:
        return "-"
    notes[f"{repo}/{pattern}"] = missing[pattern]
    return "!"


def models(
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", show_default=f"{DEFAULT_DIR}",
                                             help="Models folder to check for files."),
) -> None:
    """List every known model: variant, size (per expert for an expert pair), files it needs and which are present."""
    import torch

    import wan_models
    from wan_models import DiTConfig, MotionController, WanDiT

    # A folder named on the command line that does not exist is almost always a typo; listing every
    # file as missing would read as "nothing downloaded yet" and hide it, so it is an error. The
    # default folder may well not exist yet (nothing downloaded): the registry is still worth listing.
    if local_dir is not None and not local_dir.is_dir():
        raise FileNotFoundError(f"--local-dir {local_dir}: no such folder"
                                + (" (it is a file)" if local_dir.exists() else ""))
    folder = local_dir or DEFAULT_DIR
    rows = [("model", "variant", "params", "files (+ present, ! incomplete, - missing)")]
    notes: dict[str, str] = {}
    for name, spec in wan_models.MODELS.items():
        is_dit = isinstance(spec.config, DiTConfig)
        with torch.device("meta"):
            module = WanDiT(spec.config) if is_dit else MotionController(spec.config)
        params = sum(p.numel() for p in module.parameters())
        variant = spec.config.variant if is_dit else f"speed control for {spec.base_model}"
        size = f"{params / 1e9:.2f}B" + (f" x{len(spec.experts)}" if spec.experts else "")
        files = " ".join(_status(folder, spec.model_id, p, notes) + p for p in spec.files)
        rows.append((name, variant, size, files))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    for where, what in notes.items():
        typer.echo(f"! {folder / where}: {what} (`wan download` fetches it again)")
    if local_dir is None and not folder.is_dir():
        typer.echo(f"note: there is no models folder {folder.absolute()} yet, so every file shows as missing; "
                   "`wan download MODEL` creates it, --local-dir names another", err=True)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
