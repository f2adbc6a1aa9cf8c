"""``wan info FILE``: what a checkpoint holds — format, network, variant, dtypes, parameter count."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer


def info(path: Path = typer.Argument(..., help="A checkpoint file, shard folder or diffusers folder.")) -> None:
    """Describe a checkpoint without loading it into a network."""
    import wan_models
    from wan_models.formats import detect_format, to_official

    sd = wan_models.read_state_dict(path)
    fmt = detect_format(sd)
    official = to_official(sd)
    network = wan_models.detect_network(official)
    config = network.config_from_state_dict(network.module_keys(official))
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in sd.values())
    params = sum(t.numel() for t in sd.values())
    typer.echo(f"file:     {path}")
    typer.echo(f"format:   {fmt}")
    typer.echo(f"network:  {network.name}" + (f" ({config.variant})" if hasattr(config, "variant") else ""))
    typer.echo(f"dtypes:   {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}")
    typer.echo(f"params:   {params:,} ({params / 1e9:.2f}B) in {len(sd)} tensors")
    matches = [name for name, spec in wan_models.MODELS.items() if spec.config == config]
    if matches:
        typer.echo(f"matches:  {', '.join(matches)}")
    typer.echo(f"config:   {config}")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
