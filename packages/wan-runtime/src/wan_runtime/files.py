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


def check_writable(path: str | os.PathLike) -> Path:
    """Check, before long work, that a file can be written at ``path``; returns it absolute.

    ``path`` must not be a folder, its nearest existing ancestor must be a folder, and a file must be
    creatable there (tried for real: permission bits say nothing for root or on read-only mounts).
    Raises ``OSError`` naming ``path`` and the reason.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name inside it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        probe_folder(folder)
    except OSError as e:
        raise PermissionError(f"cannot write {path}: {folder} does not accept new files ({e.strerror})") from None
    return path


def probe_folder(folder: str | os.PathLike) -> None:
    """Create and remove a file in ``folder``; the ``OSError`` of a folder that takes no new files."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".wan-write-check.")
    os.close(fd)
    os.unlink(probe)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's ``KeyboardInterrupt`` (see :func:`interrupt_on_sigterm`).

    ``Terminated.received`` stays true once one was raised, for entry points whose framework turns
    every ``KeyboardInterrupt`` into one exit code (typer: 130) but that exit 143 for SIGTERM.
    """

    received = False


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread, as Ctrl-C does.

    Python's default for SIGTERM ends the process at once, skipping ``finally`` blocks, so a write in
    progress would leave its temp file behind; raised as an interrupt, :func:`atomic_path` removes it.
    Commands that write call this once at start; it does nothing outside the main thread.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def raise_interrupt(signum: int, _frame: object) -> None:
        Terminated.received = True
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, raise_interrupt)
