"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import signal
import subprocess

import pytest


@pytest.fixture
def wan_main(capsys, monkeypatch):
    """``wan ARGS`` through the real ``main()`` in this process (no interpreter start-up). Returns a
    ``CompletedProcess`` with the exit code, stdout and stderr; the SIGTERM handler main installs is
    not installed, so pytest keeps its own."""
    from wan_cli.main import main

    monkeypatch.setattr(signal, "signal", lambda *_: None)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, exit_.value.code, out, err)

    return run
