"""Helpers of the wan-train tests: synthetic videos, metadata files, the flags of a small run, and running
and comparing runs in their own processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from wan_models.configs import T5_FILE, VAE_FILE

HEIGHT, WIDTH, FRAMES = 32, 48, 5
VIDEO_SIZE, VIDEO_FRAMES = (56, 40), 7


def moving_square(seed: int, frames: int = VIDEO_FRAMES, size: tuple[int, int] = VIDEO_SIZE) -> list[Image.Image]:
    """A coloured square sliding over a gradient: smooth content that H.264 keeps well."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
    out = []
    for t in range(frames):
        array = np.broadcast_to(base, (height, width, 3)).copy()
        x, y = 4 + 5 * t, 6 + t
        array[y:y + 12, x:x + 12] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(array.astype(np.uint8)))
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def model_paths(release: Path, dit: Path | list[Path] | None = None, *extra: Path) -> str:
    """``--model_paths`` JSON: the DiT (default: the release's), umT5, VAE and any extra files."""
    dit = release / "diffusion_pytorch_model.safetensors" if dit is None else dit
    items: list[Any] = [[str(p) for p in dit] if isinstance(dit, list) else str(dit),
                        str(release / T5_FILE), str(release / VAE_FILE), *map(str, extra)]
    return json.dumps(items)


def train_argv(release: Path, dataset: Path, output: Path, *extra: str, metadata: str = "metadata.csv",
               paths: str | None = None) -> list[str]:
    """Flags of a small float32 run (LoRA or full comes from ``extra``)."""
    return ["--dataset_base_path", str(dataset), "--dataset_metadata_path", str(dataset / metadata),
            "--height", str(HEIGHT), "--width", str(WIDTH), "--num_frames", str(FRAMES),
            "--model_paths", paths or model_paths(release), "--output_path", str(output), "--torch_dtype", "float32",
            "--dataset_num_workers", "0", "--disable_progress_bar", *extra]


class Killed(Exception):
    """Stands for the kill of a run in its middle (raised from the step callback)."""


def train_until_killed(args: Any, step: int) -> None:
    """Run ``wan_train.train(args)`` and stop it, as a kill would, right after optimizer step ``step``."""
    import pytest

    from wan_train import train

    def stop(progress: Any, loss: float) -> None:
        if progress.step == step:
            raise Killed

    with pytest.raises(Killed):
        train(args, on_step=stop)


def sigkill_after_saves(argv: list[str], output: Path, saves: int, timeout: float = 120.0) -> str:
    """Run ``python -m wan_train argv`` (saving a resume state every step), SIGKILL it once the latest
    state is from batch ``saves`` or later, whatever it is doing then; returns that latest state's name."""
    import pytest

    from wan_train.state import STATE_DIR

    log = output.with_name(output.name + ".stderr.log")  # a file, not a pipe: a full pipe would stall the run
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "wan_train", *argv],
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=stderr)
        latest = output / STATE_DIR / "latest"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if latest.is_file() and int(latest.read_text().rsplit("-b", 1)[1]) >= saves:
                break
            time.sleep(0.02)
        running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
    if not running or not latest.is_file():
        pytest.fail(f"the run ended or saved nothing before it could be killed (exit {process.returncode}): "
                    f"{log.read_text(errors='replace')[-2000:]}")
    return latest.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert set(x) == set(y)
    return max((x[k] - y[k]).abs().max().item() for k in x)


WEIGHT_TOLERANCE = 2e-5  # max |w_multi - w_single| after 4 steps at lr 1e-3 (see test_distributed.py)


def logged_losses(output: Path) -> list[float]:
    """The losses a run wrote to ``train_log.jsonl``, in order."""
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]
