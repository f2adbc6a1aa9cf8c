"""``wan info FILE``: what a checkpoint holds — format, network, variant, family and expert (and what
decided them), stored dtypes, parameters, and whether every weight is finite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer


def info(path: Path = typer.Argument(..., help="A checkpoint file, shard folder, diffusers folder or LoRA file.")
         ) -> None:
    """Describe a checkpoint: how it is stored, which network and sizes it holds, and NaN/inf weights;
    or a LoRA file: its layout, layers, ranks and scale, the DiT sizes it fits and what it was trained for."""
    import torch

    import wan_models
    from wan_models import integrity
    from wan_models.loading import read_checkpoint

    from .lora_files import describe_lora, is_lora_state

    stored = wan_models.read_state_dict(path)
    if path.is_file() and is_lora_state(list(stored)):
        describe_lora(path, stored, typer.echo)
        return
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in stored.values())
    ckpt = read_checkpoint(path)
    with torch.device("meta"):
        params = sum(p.numel() for p in ckpt.network.module(ckpt.config).parameters())
    variant = getattr(ckpt.config, "variant", None)
    typer.echo(f"file:     {path}")
    typer.echo(f"format:   {ckpt.format}")
    typer.echo(f"network:  {ckpt.network.name}" + (f" ({variant})" if variant else ""))
    if ckpt.identity is not None:
        typer.echo(f"family:   {ckpt.identity.describe()}")
    typer.echo(f"stored:   {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())} ({len(stored)} tensors)")
    typer.echo(f"params:   {params:,} ({params / 1e9:.2f}B)")
    role = f" ({ckpt.identity.expert}-noise expert)" if ckpt.identity and ckpt.identity.expert else ""
    matches = [name + (role if spec.experts else "") for name, spec in wan_models.MODELS.items()
               if spec.config == ckpt.config]
    if matches:
        typer.echo(f"matches:  {', '.join(matches)}")
    typer.echo(f"config:   {ckpt.config}")
    counts = integrity.non_finite(stored.items())  # memory-mapped tensors, read one at a time
    sizes = {key: stored[key].numel() for key in counts}
    typer.echo(f"finite:   {'NO: ' + integrity.describe_non_finite(counts, sizes) if counts else 'all finite'}")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
