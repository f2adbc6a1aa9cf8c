"""Atomic writes: whole file or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from wan_runtime.files import atomic_path


def test_success_replaces_with_normal_permissions(tmp_path) -> None:
    target = tmp_path / "sub" / "out.bin"
    old = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_failure_keeps_the_old_file_and_no_temp(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
