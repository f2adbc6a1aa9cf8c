"""``wan models``: the registry as a table, with which files are present locally, and whole (under
either hub's repository id: ``wan download --source`` stores a model under the id of its hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from wan_models import ModelSpec
from wan_runtime import hubs
from wan_runtime.model_config import COMMON_FILES_BY_HUB, missing_files

DEFAULT_DIR = Path("models")


def _repos(spec: ModelSpec, pattern: str) -> list[str]:
    """The folders (repository ids) a file of ``spec`` is stored under: the ModelScope one, then the Hub's."""
    ids = {hubs.MODELSCOPE: spec.model_id, hubs.HUGGINGFACE: spec.hf_id}
    return list(dict.fromkeys(COMMON_FILES_BY_HUB[hub].get(pattern, repo) for hub, repo in ids.items()))


def _status(local_dir: Path, spec: ModelSpec, pattern: str, notes: dict[str, str]) -> str:
    """``+`` whole under either hub's id, ``!`` there but incomplete (why goes to ``notes``), ``-`` missing."""
    problems = {}
    for repo in _repos(spec, pattern):
        missing = missing_files(local_dir.absolute() / repo, [pattern])
        if pattern not in missing:
            return "+"
        if missing[pattern]:
            problems[f"{repo}/{pattern}"] = missing[pattern]
    notes.update(problems)
    return "!" if problems else "-"


def models(
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", show_default=f"{DEFAULT_DIR}",
                                             help="Models folder to check for files."),
) -> None:
    """List every known model: variant, size (per expert for an expert pair), files it needs and which are present.

    A file counts as present when it is whole under the model's ModelScope id or its Hugging Face Hub id
    (e.g. PAI/... or alibaba-pai/...), whichever hub it was downloaded from.
    """
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
        files = " ".join(_status(folder, spec, p, notes) + p for p in spec.files)
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
