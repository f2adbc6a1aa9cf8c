"""What a download should have brought: the hub's file list, kept beside the files, and the checks.

At download time :func:`fetch` asks ModelScope for the repository's files (path, size and, where
the hub gives it, sha256) and :func:`write` keeps them as ``.wan_manifest.json`` in the model
folder. :func:`problem` says why a file on disk is not the whole file: its size differs from the
manifest's, its header or end record shows it cut short (:func:`wan_models.integrity.file_problem`,
which needs no manifest) or, only when asked, its sha256 differs. Without ``verify`` only sizes
and headers are read, so checking a model folder takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from wan_models import integrity

from .files import atomic_path

logger = logging.getLogger(__name__)

NAME = ".wan_manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Entry:
    """One file as the hub lists it; ``None`` where the hub did not say."""

    size: int | None
    sha256: str | None = None


def from_listing(files: Iterable[Mapping[str, Any]]) -> dict[str, Entry]:
    """Entries from ModelScope's ``get_model_files`` dicts (``Path``, ``Size``, ``Sha256``; folders skipped)."""
    out = {}
    for item in files:
        path, size, sha256 = item.get("Path"), item.get("Size"), item.get("Sha256")
        if item.get("Type") == "tree" or not isinstance(path, str) or not path:
            continue
        sha256 = sha256.lower() if isinstance(sha256, str) and _SHA256.fullmatch(sha256.lower()) else None
        out[path] = Entry(size if isinstance(size, int) and not isinstance(size, bool) else None, sha256)
    return out


def fetch(model_id: str) -> dict[str, Entry]:
    """The files of ModelScope repository ``model_id`` (network access; raises what the client raises)."""
    from modelscope import HubApi

    return from_listing(HubApi().get_model_files(model_id, recursive=True))


def write(local_dir: Path, model_id: str, entries: Mapping[str, Entry]) -> Path:
    """Keep ``entries`` as the manifest of ``local_dir`` (atomically); returns its path."""
    data = {"model_id": model_id,
            "files": {path: {"size": e.size, "sha256": e.sha256} for path, e in sorted(entries.items())}}
    with atomic_path(local_dir / NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return local_dir / NAME


def read(local_dir: Path) -> dict[str, Entry]:
    """The manifest of ``local_dir``; empty when there is none (or, with a warning, when it is unreadable)."""
    path = local_dir / NAME
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        return {rel: Entry(e.get("size"), e.get("sha256")) for rel, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("ignoring the unreadable download manifest %s (%s): checking files by their headers only",
                       path, e)
        return {}


def sha256(path: Path) -> str:
    """The file's sha256 (reads it whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def problem(path: Path, entry: Entry | None = None, *, verify: bool = False) -> str | None:
    """Why ``path`` is not the whole file ``entry`` describes (e.g. ``"truncated: 10 of 20 bytes"``), or None."""
    size = path.stat().st_size
    if entry is not None and entry.size is not None and size != entry.size:
        if size < entry.size:
            return f"truncated: {size:,} of {entry.size:,} bytes"
        return f"{size:,} bytes, more than the {entry.size:,} the hub lists"
    found = integrity.file_problem(path)
    if found:
        return found
    if verify and entry is not None and entry.sha256 and sha256(path) != entry.sha256:
        return "corrupt: its sha256 differs from the hub's"
    return None
