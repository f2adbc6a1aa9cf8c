"""Helpers of the serve tests: real `wan serve` / `wan worker` subprocesses (test_postgres.py,
test_restart.py, ...), submitting, waiting for and decoding jobs over HTTP, threads released at once, and
random test images."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from wan_serve.store import JobStore, jobs

WAN = Path(sys.executable).with_name("wan")  # the console script of the venv running the tests
START_TIMEOUT = 120.0

TINY = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}  # a fast tiny-model job (4k+1 frames)


def at_once(count: int, task: Callable[[int], None]) -> None:
    """Run ``task(0) ... task(count - 1)`` in ``count`` threads released together by a barrier; re-raise
    what any of them raised (all of them listed) once all have finished."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            task(n)
        except BaseException as error:  # surfaced in the calling thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors


def expire_leases(store: JobStore, worker_id: str) -> None:
    """End the leases of ``worker_id``'s running jobs now, as if it had stopped renewing them long ago: the
    lease tests then depend on no sleep racing a slow machine."""
    from sqlalchemy import update

    with store.engine.begin() as connection:
        connection.execute(update(jobs).where(jobs.c.worker_id == worker_id, jobs.c.status == "in_progress")
                           .values(lease_expires_at=0.0))


def open_concurrently(url: str, openers: int = 8) -> None:
    """``openers`` threads construct a JobStore on one database at the same moment, as `wan serve` and its
    `wan worker` processes do when started side by side on an empty database."""
    stores: list[JobStore] = []
    try:
        at_once(openers, lambda _n: stores.append(JobStore(url)))
    finally:
        for store in stores:
            store.close()
    assert len(stores) == openers


def submit(client: httpx.Client, prompt: str, **extra) -> str:
    """POST /v1/videos with a tiny job (``extra`` overrides); returns the new job's id."""
    response = client.post("/v1/videos", json={**TINY, "prompt": prompt, **extra})
    assert response.status_code == 200, response.text
    video = response.json()
    assert video["object"] == "video" and video["status"] == "queued", video
    return video["id"]


def wait_until_finished(client: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll GET /v1/videos/{id} until every job is completed or failed; fail naming the stragglers."""
    deadline = time.monotonic() + timeout
    finished: dict[str, dict] = {}
    while time.monotonic() < deadline and len(finished) < len(ids):
        for job_id in ids:
            if job_id not in finished:
                video = client.get(f"/v1/videos/{job_id}").json()
                if video["status"] in ("completed", "failed"):
                    finished[job_id] = video
        time.sleep(0.2)
    missing = sorted(set(ids) - set(finished))
    assert not missing, f"not finished after {timeout:.0f} s: {missing}"
    return finished


def decoded_frames(mp4: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4 decoded with PyAV: proof that the bytes are a playable video."""
    with av.open(io.BytesIO(mp4)) as container:
        frames = list(container.decode(video=0))
    assert frames, "the mp4 holds no video frames"
    return len(frames), frames[0].width, frames[0].height


def png_bytes(width: int, height: int, seed: int | None = None, fmt: str = "PNG") -> bytes:
    """A ``width`` x ``height`` RGB image of random noise (``seed`` None: fresh noise) encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def attempts_after_one_run(folder) -> int:
    """The ``attempts`` a job shows after exactly one claim, read from a scratch SQLite store: the tests
    compare against it so that they prove "ran once" / "ran twice" whether the store counts runs or re-runs."""
    store = JobStore(f"sqlite:///{folder}/attempts-probe.db")
    try:
        store.create({"model": "probe", "prompt": "probe", "params": {}, "size": "32x32", "seconds": "1",
                      "num_frames": 5}, None)
        return store.claim("probe-worker", ["probe"], 60.0).attempts
    finally:
        store.close()


@dataclass
class WanProcess:
    """One `wan serve` or `wan worker` subprocess, its output in ``log_path``."""

    name: str  # names its log file: the worker's id for a worker
    args: list[str]
    log_path: Path
    ready_text: str
    url: str | None = None  # http://127.0.0.1:PORT of a `wan serve`, read from its ready line
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> "WanProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "WanProcess":
        """Wait for the ready log line (and, for a server, a 200 from /healthz); fail with the log if the
        process dies first or takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.args} exited with {self.proc.returncode} before it was ready:\n"
                            f"{self.log()[-4000:]}", pytrace=False)
            found = re.search(re.escape(self.ready_text) + r"( http://[\w.:\[\]-]+)?", self.log())
            if found and self.args[1] == "worker":
                return self
            if found and found.group(1):
                self.url = found.group(1).strip()
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        pytest.fail(f"{self.args} not ready after {timeout:.0f} s (no {self.ready_text!r}):\n"
                    f"{self.log()[-4000:]}", pytrace=False)

    def terminate(self) -> None:
        """SIGTERM, if the process is still running; returns at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout: float = 30.0) -> int | None:
        """Wait up to ``timeout`` for the process to exit, then SIGKILL it; returns the exit code."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (what the durability tests are about)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.wait_or_kill()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit code."""
        self.terminate()
        return self.wait_or_kill(timeout)


class WanProcesses:
    """Starts `wan serve` / `wan worker` on the embedded tiny model (CPU, float32) with their output in
    ``folder``; :meth:`stop_all` stops every one still running."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[WanProcess] = []
        if not WAN.exists():
            pytest.fail(f"the `wan` command is not installed beside {sys.executable}: run `make install`",
                        pytrace=False)
        # One thread per process: several of them share the CI machine's two cores.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop("WAN_API_TOKEN", None)

    def serve(self, *args: str, state_dir: Path | None = None, name: str = "serve", wait: bool = True) -> WanProcess:
        """`wan serve` on a port the OS picks (read back from its ready line); ``state_dir`` defaults to a
        folder named after ``name``."""
        state_dir = state_dir or self.folder / f"state-{name}"
        argv = [str(WAN), "serve", "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir),
                "--device", "cpu", "--dtype", "float32", *args]
        proc = WanProcess(name, argv, self.folder / f"{name}.log", ready_text="wan serve: listening on")
        self.started.append(proc.start(self.env))
        return proc.wait_ready() if wait else proc

    def worker(self, db_url: str, *args: str, worker_id: str, wait: bool = True) -> WanProcess:
        """`wan worker --db URL --worker-id ID` on the tiny model."""
        argv = [str(WAN), "worker", "--db", db_url, "--worker-id", worker_id, "--device", "cpu",
                "--dtype", "float32", *args]
        proc = WanProcess(worker_id, argv, self.folder / f"worker-{worker_id}.log",
                          ready_text=f"wan worker {worker_id}: waiting for jobs")
        self.started.append(proc.start(self.env))
        return proc.wait_ready() if wait else proc

    def stop_all(self) -> None:
        """SIGTERM to every process at once, then wait for each (SIGKILL after 30 s)."""
        for proc in self.started:
            proc.terminate()
        for proc in self.started:
            proc.wait_or_kill()
