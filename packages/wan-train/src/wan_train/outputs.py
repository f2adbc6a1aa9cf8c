"""Writing a run's outputs: the folder checked before any work, failed writes as one-line errors.

Every file goes through a temporary name and a rename (:func:`atomic_write`), or into a folder that
is removed when anything in it fails (``save_state``), so a full disk, a size limit or a kill (SIGTERM
arrives as ``KeyboardInterrupt``, see :func:`wan_runtime.files.interrupt_on_sigterm`) never leaves a
half-written file. Write failures become :class:`TrainingError` naming the file and the likely cause.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from wan_runtime.files import atomic_path, probe_folder

from .args import TrainingError

__all__ = ["append_line", "atomic_write", "check_output_folder", "write_error", "writing"]

NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def check_output_folder(path: str | Path, flag: str) -> Path:
    """Create the folder ``flag`` names and write (then remove) a probe file in it; raises
    :class:`TrainingError` naming the path and why it cannot hold the outputs."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{flag} {folder} is a file, not a folder; give a folder for the outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{flag} {folder}: cannot create the folder ({e.strerror}); give a folder you can "
                            "write to") from None
    try:
        probe_folder(folder)
    except OSError as e:
        raise TrainingError(f"{flag} {folder}: cannot write files in this folder ({e.strerror}); give a folder "
                            "you can write to") from None
    return folder


def write_error(path: str | Path, error: BaseException) -> TrainingError:
    """The :class:`TrainingError` for a failed write of ``path``: permissions, or most likely a full disk."""
    if isinstance(error, OSError) and error.errno in NOT_WRITABLE:
        return TrainingError(f"cannot write {path}: {error.strerror}; the folder is not writable")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return TrainingError(f"cannot write {path} ({reason}): the disk may be full ({free}) or a file size limit "
                         "reached; free some space or choose another output folder")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` in the block into :func:`write_error`'s :class:`TrainingError`.

    ``RuntimeError`` is torch.save's (``PytorchStreamWriter failed writing file ...``), ``SafetensorError``
    safetensors'; keep the block to the write itself.
    """
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        raise write_error(path, e) from e


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary_path)``, then rename it to ``path``; on any failure nothing is left behind."""
    path = Path(path)
    with writing(path), atomic_path(path) as tmp:
        write(tmp)
    return path


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``; a failed write is cut off again, so every line is whole."""
    data = memoryview((line + "\n").encode())
    with writing(path), open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
        except BaseException:
            f.truncate(start)
            raise
