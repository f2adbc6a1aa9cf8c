"""``benchmarks/gpu_suite.sh``: valid bash, and its dry run names only scripts and tests that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_dry_run_steps_reference_existing_paths() -> None:
    out = subprocess.run(["bash", str(SUITE), "--dry-run"], cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=60).stdout
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) >= 8, out
    paths = re.findall(r"(?:benchmarks|tests)/[\w./-]+", "\n".join(steps))
    for script in ("pipeline", "dit_forward", "vae_decode", "offload", "kernels", "attention", "compile"):
        assert f"benchmarks/{script}.py" in paths
    assert any(p.startswith("tests/") for p in paths)
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_unknown_arguments_are_refused() -> None:
    result = subprocess.run(["bash", str(SUITE), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr
