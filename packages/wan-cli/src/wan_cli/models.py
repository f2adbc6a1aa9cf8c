"""``wan models``: the registry as a table, with which files are present locally."""

from __future__ import annotations

from pathlib import Path

import typer

from wan_runtime.model_config import COMMON_FILES


def _present(local_dir: Path, model_id: str, pattern: str) -> bool:
    folder = local_dir / COMMON_FILES.get(pattern, model_id)
    return any(folder.glob(pattern.rstrip("/")))


def models(
    local_dir: Path = typer.Option(Path("models"), "--local-dir", help="Models folder to check for files."),
) -> None:
    """List every known model: variant, size, files it needs and which are present."""
    import torch

    import wan_models
    from wan_models import DiTConfig, MotionController, WanDiT

    rows = [("model", "variant", "params", "files (+ present, - missing)")]
    for name, spec in wan_models.MODELS.items():
        is_dit = isinstance(spec.config, DiTConfig)
        with torch.device("meta"):
            module = WanDiT(spec.config) if is_dit else MotionController(spec.config)
        params = sum(p.numel() for p in module.parameters())
        variant = spec.config.variant if is_dit else f"speed control for {spec.base_model}"
        files = " ".join(("+" if _present(local_dir, spec.model_id, p) else "-") + p for p in spec.files)
        rows.append((name, variant, f"{params / 1e9:.2f}B", files))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])


def register(app: typer.Typer) -> None:
    app.command("models")(models)
