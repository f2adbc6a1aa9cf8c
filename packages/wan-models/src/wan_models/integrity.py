"""Cheap checks that a checkpoint file is whole and that its weights are finite.

:func:`file_problem` reads only a file's header or end record: a ``.safetensors`` header must
describe data that exactly fills the file, a zip-format torch checkpoint must end in its central
directory, and a ``.pth``-like file must at least be a zip archive or a pickle. A download cut
short fails these checks. :func:`count_non_finite` counts NaN/inf values of one tensor, with a
single reduction when there are none.
"""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .formats.comfy import FP8_DTYPES

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
ZIP_MAGIC = b"PK\x03\x04"
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors itself refuses larger headers


def torch_file_kind(path: Path) -> str:
    """``"zip"`` (torch.save's format), ``"pickle"`` (legacy torch.save) or ``"other"``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        return "zip"
    # torch.save writes pickle protocol 2 (legacy format); other writers use up to 5. Both start with PROTO.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "other"


def foreign_globals(path: Path, pickles: int = 5) -> list[str]:
    """Classes and functions other than torch's (and ``OrderedDict``) that the pickles at the start
    of a legacy ``path`` name: what unpickling would call. Read with :mod:`pickletools`, never run.

    A legacy torch.save file is 5 pickles (magic, protocol, sys info, the object, storage keys)
    followed by raw data; a plain ``pickle.dump`` is one. Reading stops at the first undecodable byte.
    """
    names: list[str] = []
    strings: list[str] = []
    with open(path, "rb") as f:
        for _ in range(pickles):
            try:
                for opcode, arg, _pos in pickletools.genops(f):
                    if isinstance(arg, str):
                        strings.append(arg)
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(".".join(str(arg).split(" ", 1)))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    if opcode.name == "STOP":
                        break
            except (ValueError, EOFError, UnicodeDecodeError):
                break
    allowed = ("collections.OrderedDict",)
    return list(dict.fromkeys(n for n in names if not (n.startswith("torch.") or n in allowed)))


def _safetensors_problem(path: Path, size: int) -> str | None:
    if size < 8:
        return f"truncated: {size} bytes, too short for a .safetensors header length"
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_SAFETENSORS_HEADER:
            return f"not a .safetensors file (its header length {length:,} is impossible)"
        if 8 + length > size:
            return f"truncated: {size:,} bytes, less than its {length:,}-byte header"
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a .safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a .safetensors file (its header is not a JSON object)"
    try:
        data_end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "not a .safetensors file (its header lacks tensor data offsets)"
    expected = 8 + length + data_end
    if size < expected:
        return f"truncated: {size:,} of the {expected:,} bytes its header describes"
    if size > expected:
        return f"corrupt: {size:,} bytes, more than the {expected:,} its header describes"
    return None


def _torch_problem(path: Path, size: int) -> str | None:
    kind = torch_file_kind(path)
    if kind == "other":
        return "not a torch checkpoint (neither a zip archive nor a pickle)"
    if kind == "zip":
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, ValueError):
            return f"truncated: a zip archive without its end record ({size:,} bytes)"
    return None


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a whole checkpoint file (e.g. ``"truncated: ..."``), or None.

    Only headers and end records are read. Files of other types, and legacy pickles (whose end
    holds raw data with no record), always pass.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0 and path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        return "empty (0 bytes)"
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _safetensors_problem(path, size)
    if path.suffix in PICKLE_SUFFIXES:
        return _torch_problem(path, size)
    return None


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    # Reductions are not implemented for fp8; float16 holds every fp8 value (and its NaN/inf).
    return tensor.to(torch.float16) if tensor.dtype in FP8_DTYPES else tensor


def finite_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 sum of a floating ``tensor``: not finite when it holds NaN/inf (or, rarely, a
    float16 sum overflows), for :func:`count_non_finite` to confirm. Does not synchronise a GPU."""
    return _checkable(tensor).sum().to(torch.float32)


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/inf values ``tensor`` holds (0 for non-floating tensors)."""
    if not tensor.is_floating_point() or torch.isfinite(finite_sum(tensor)):
        return 0
    return int((~torch.isfinite(_checkable(tensor))).sum())


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Keys of the tensors holding NaN/inf -> their count, in order, checking one tensor at a time."""
    counts = {}
    for key, tensor in tensors:
        count = count_non_finite(tensor)
        if count:
            counts[key] = count
    return counts


def describe_non_finite(counts: Mapping[str, int], sizes: Mapping[str, int], limit: int = 3) -> str:
    """``"2 tensors hold NaN/inf values: a (3 of 1,024 values), b (1 of 16 values)"``."""
    listed = [f"{key} ({count:,} of {sizes[key]:,} values)" for key, count in list(counts.items())[:limit]]
    more = f" and {len(counts) - limit} more" if len(counts) > limit else ""
    noun = "tensor holds" if len(counts) == 1 else "tensors hold"
    return f"{len(counts)} {noun} NaN/inf values: {', '.join(listed)}{more}"
