"""Entry point: one Typer app with a sub-command per file; ``--config FILE.toml`` supplies defaults.

Errors never reach the user as a Python traceback: bad usage prints click's usage line and exits 2,
anything else one ``error:`` line and exits 1 (``wan --debug ...`` re-raises to show the traceback).
Ctrl-C and SIGTERM both unwind normally, so no temp file is left behind (exit 130 and 143).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

# Plain one-line error messages (no rich boxes): must be set before typer is imported.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402

from . import convert, download, generate, info, models, serve, train  # noqa: E402

app = typer.Typer(help="Wan 2.1 video generation: make videos, fetch, inspect and convert models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for module in (generate, download, models, info, convert, train, serve):
    module.register(app)

# Errors whose message tells the user what to fix; anything else is reported as unexpected.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError, OSError)
INTERRUPTED = 130


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an error.")) -> None:
    """Wan 2.1 video generation: make videos, fetch, inspect and convert models."""


def _wants_debug(args: Sequence[str]) -> bool:
    """Whether ``--debug`` stands before the sub-command (where the app's own options go)."""
    for arg in args:
        if not arg.startswith("-"):
            return False
        if arg == "--debug":
            return True
    return False


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``wan``; failures the user can fix print one line and exit non-zero (2 for bad usage)."""
    from wan_runtime.files import Terminated, interrupt_on_sigterm

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    interrupt_on_sigterm()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _wants_debug(args)
    try:
        code = app(args=args, prog_name="wan", standalone_mode=False)
    except typer.TyperException as e:  # usage errors: click's usage line and message
        e.show()
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        if debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        _fail(str(message), 1)
    except Exception as e:  # a bug, not a user error: still one line unless asked for the traceback
        if debug:
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (rerun as `wan --debug ...` for the traceback, and please "
              "report it)", 1)
    if code == INTERRUPTED:  # typer's exit code for a KeyboardInterrupt (Ctrl-C, or SIGTERM through ours)
        if Terminated.received:
            _fail("terminated (SIGTERM); no partial output was left", 143)
        _fail("interrupted; no partial output was left", INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
