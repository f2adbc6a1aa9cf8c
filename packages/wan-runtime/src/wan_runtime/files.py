"""Writing files so that a reader never sees half of one: a temp file beside it, then a rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The result gets the usual permissions for a new file (``0o666`` less the umask), not the
    owner-only ones of a temp file. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread, as Ctrl-C does.

    Python's default for SIGTERM ends the process at once, skipping ``finally`` blocks, so a write in
    progress would leave its temp file behind; raised as an interrupt, :func:`atomic_path` removes it.
    Commands that write call this once at start; it does nothing outside the main thread.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def raise_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"terminated by signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, raise_interrupt)
