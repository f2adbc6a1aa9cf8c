"""``wan train [flags]``: fine-tune (LoRA or full) with the seed's ``train.py`` flags, as ``python -m wan_train``.

Wan 2.1 and 2.2 models; a Wan 2.2 A14B model one expert at a time (``--expert high|low``).

Every argument goes to ``wan_train`` unchanged, ``--help`` included; for several GPUs launch it
through ``accelerate launch -m wan_train ...`` (see docs/training.md).
"""

from __future__ import annotations

import typer


def train(ctx: typer.Context) -> None:
    """Train a LoRA or the full model on your videos, Wan 2.1 or 2.2 (all flags: wan train --help)."""
    from wan_train import main

    raise typer.Exit(main(list(ctx.args)))


def register(app: typer.Typer) -> None:
    app.command("train", add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train)
