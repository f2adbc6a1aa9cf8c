"""Entry point: one Typer app with a sub-command per file; ``--config FILE.toml`` supplies defaults."""

from __future__ import annotations

import logging
import os
import sys

# Plain one-line error messages (no rich boxes): must be set before typer is imported.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402

from . import convert, download, generate, info, models, train  # noqa: E402

app = typer.Typer(help="Wan 2.1 video generation: make videos, fetch, inspect and convert models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for module in (generate, download, models, info, convert, train):
    module.register(app)


def main() -> None:
    """Run ``wan``; failures the user can fix print one line and exit non-zero (2 for bad usage)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()  # standalone: usage errors print their message and exit 2
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)
