"""Discovery and comparison for reference fixture sets (format: shared/parity/README.md).

A set lives at ``$WAN_PARITY_DIR`` (default ``<repo>/../shared/parity``) for Wan 2.1, and at
``$WAN22_PARITY_DIR`` (default ``<repo>/../shared/parity-wan22``) for Wan 2.2: pass
``family="wan22"``. Each test file that checks parity parametrizes over :func:`case_names` for the
runners it owns and fails on a runner nobody owns, so no case can silently go untested.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


# family -> (environment variable naming the set, default folder beside the repository)
SETS = {"wan21": ("WAN_PARITY_DIR", "parity"), "wan22": ("WAN22_PARITY_DIR", "parity-wan22")}


def parity_root(family: str = "wan21") -> Path:
    variable, folder = SETS[family]
    return Path(os.environ.get(variable, REPO_ROOT.parent / "shared" / folder))


def manifest(family: str = "wan21") -> dict[str, Any]:
    path = parity_root(family) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no parity manifest at {path}; set {SETS[family][0]} to a fixture set")
    return json.loads(path.read_text())


def case_names(family: str = "wan21") -> list[str]:
    return list(manifest(family)["cases"])


@dataclass
class ParityCase:
    """One fixture case: its ``case.json`` plus lazily loaded tensors."""

    name: str
    dir: Path
    spec: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, name: str, family: str = "wan21") -> "ParityCase":
        case_dir = parity_root(family) / name
        return cls(name, case_dir, json.loads((case_dir / "case.json").read_text()))

    @property
    def runner(self) -> str:
        return self.spec["runner"]

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.get("config", {})

    @property
    def constants(self) -> dict[str, Any]:
        return self.spec.get("constants", {})

    @property
    def literal_args(self) -> dict[str, Any]:
        return self.spec.get("call", {}).get("literal_args", {})

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        path = self.dir / "weights.safetensors"
        return load_file(path) if path.is_file() else {}

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        return load_file(self.dir / "inputs.safetensors")

    @cached_property
    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(self.dir / "outputs.safetensors")

    def extra_weights(self, role: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(config, state_dict)`` of a second checkpoint named in ``extra_weights``."""
        extra = self.spec["extra_weights"][role]
        return extra.get("config", {}), load_file(self.dir / extra["file"])


Runner = Callable[[ParityCase], dict[str, torch.Tensor]]


def assert_matches(case: ParityCase, actual: dict[str, torch.Tensor]) -> None:
    """Every expected output is present and within the case's tolerance (integers exactly)."""
    tol = case.spec["tolerance"]
    missing = sorted(set(case.expected) - set(actual))
    assert not missing, f"{case.name}: runner produced no {missing}"
    for key, want in case.expected.items():
        got = actual[key].detach().cpu()
        assert got.shape == want.shape, f"{case.name}/{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if want.is_floating_point():
            torch.testing.assert_close(got.to(want.dtype), want, rtol=tol["rtol"], atol=tol["atol"],
                                       msg=lambda m, k=key: f"{case.name}/{k}: {m}")
        else:
            assert torch.equal(got.to(want.dtype), want), f"{case.name}/{key}: integer output differs"


def owned_cases(runners: dict[str, Runner], family: str = "wan21") -> list[str]:
    """Names of the cases in the set whose runner is in ``runners``."""
    return [n for n in case_names(family) if ParityCase.load(n, family).runner in runners]
