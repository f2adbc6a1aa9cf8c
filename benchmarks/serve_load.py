"""Load on `wan serve`: many concurrent clients, then the same generations in a plain loop.

Starts a real `wan serve` (embedded tiny model, CPU, fresh SQLite state) on a free loopback port,
runs one warm-up job, then ``--jobs`` submissions from ``--clients`` concurrent HTTP clients (each
submits its share at once, then polls its oldest unfinished job every ``--poll`` seconds). It prints
the submit latency p50/p99, jobs per minute, and the server's RSS before any job, after the first
job, half-way and at the end. The server is then stopped and the same generations (same prompts,
seeds and settings) run in this process in a plain loop through ``wan_serve.runner.run_job`` — the
call the worker makes — after one warm-up generation; the ratio of the service's time to the loop's
is the cost of serving (goal: at most 1.05). ``--worker-process`` runs the worker as a `wan worker`
process on the same SQLite database beside `wan serve --workers 0` (the multi-machine shape, on one
machine). Both sides use torch's default thread count unless ``--threads`` sets it for both. The
1-minute load average is printed beside each phase: on a shared machine, compare only runs made
under the same load.

    python benchmarks/serve_load.py [--jobs 200] [--clients 20] [--steps 2] [--frames 17] [--poll 1]
                                    [--threads N] [--worker-process] [--no-baseline]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import psutil

PROMPTS = ["a red circle moving right", "a blue square moving left", "a green triangle moving up",
           "a yellow circle moving down"]
WAN = Path(sys.executable).with_name("wan")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_params(index: int, steps: int, frames: int) -> dict:
    """The body of job ``index``: prompts and seeds vary, the settings do not."""
    return {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index + 1, "num_inference_steps": steps,
            "num_frames": frames}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank rule."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _start(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for(proc: subprocess.Popen, log_path: Path, text: str, url: str | None, timeout: float = 180.0) -> None:
    """Wait for ``text`` in the process's log (and a 200 from ``url``/healthz when given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:2]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if text in log_path.read_text(errors="replace"):
            if url is None:
                return
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise SystemExit(f"{proc.args[:2]} not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


class Server:
    """A `wan serve` on a fresh SQLite state folder, its worker a thread in it or (``worker_process``)
    a `wan worker` process on the same database; ``rss()`` is their resident memory together."""

    def __init__(self, workdir: Path, env: dict[str, str], worker_process: bool = False):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        state = workdir / "state"
        argv = [str(WAN), "serve", "--port", str(port), "--state-dir", str(state), "--device", "cpu",
                "--dtype", "float32"]
        self.procs = [_start(argv + (["--workers", "0"] if worker_process else []), workdir / "serve.log", env)]
        try:
            _wait_for(self.procs[0], workdir / "serve.log", "wan serve: listening on", self.url)
            if worker_process:
                argv = [str(WAN), "worker", "--db", f"sqlite:///{state.absolute() / 'jobs.db'}", "--worker-id",
                        "w1", "--device", "cpu", "--dtype", "float32"]
                self.procs.append(_start(argv, workdir / "worker.log", env))
                _wait_for(self.procs[1], workdir / "worker.log", "wan worker w1: waiting for jobs", None)
        except BaseException:
            self.stop()
            raise
        self.ps = [psutil.Process(proc.pid) for proc in self.procs]

    def rss(self) -> int:
        """Resident bytes of the server (and worker) processes."""
        return sum(p.memory_info().rss for p in self.ps)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_done(client: httpx.Client, job_id: str, poll: float) -> dict:
    """Poll one job until it is completed; a failed job stops the benchmark with its error."""
    while True:
        video = client.get(f"/v1/videos/{job_id}").raise_for_status().json()
        if video["status"] == "completed":
            return video
        if video["status"] == "failed":
            raise SystemExit(f"job {job_id} failed: {video['error']}")
        time.sleep(poll)


def run_clients(url: str, jobs: int, clients: int, steps: int, frames: int, poll: float,
                halfway: Callable[[], None]) -> tuple[list[float], float, list[str]]:
    """``jobs`` submissions split over ``clients`` threads; returns (submit latencies, seconds from the
    first submit to the last completion seen, job ids). ``halfway()`` runs once half the jobs are done."""
    latencies: list[float] = []
    done = [0]
    ids: list[str | None] = [None] * jobs
    errors: list[BaseException] = []
    start_gate = threading.Barrier(clients)
    lock = threading.Lock()

    def client_main(k: int) -> None:
        mine = list(range(k, jobs, clients))
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                start_gate.wait()
                for index in mine:
                    t0 = time.perf_counter()
                    response = client.post("/v1/videos", json=job_params(index, steps, frames))
                    elapsed = time.perf_counter() - t0
                    response.raise_for_status()
                    ids[index] = response.json()["id"]
                    with lock:
                        latencies.append(elapsed)
                for index in mine:  # FIFO queue: the oldest unfinished job finishes first
                    wait_done(client, ids[index], poll)
                    with lock:
                        done[0] += 1
                        if done[0] == jobs // 2:
                            halfway()
        except BaseException as e:  # reported after join
            errors.append(e)

    threads = [threading.Thread(target=client_main, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    return latencies, total, [i for i in ids if i is not None]


def check_videos(url: str, ids: list[str]) -> int:
    """Download every result; returns how many are mp4 files (an ISO-BMFF ``ftyp`` box first)."""
    good = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for job_id in ids:
            data = client.get(f"/v1/videos/{job_id}/content").raise_for_status().content
            good += data[4:8] == b"ftyp"
    return good


def baseline(jobs: int, steps: int, frames: int, threads: int | None) -> float:
    """Seconds for the same ``jobs`` generations in a plain loop: the worker's pipeline loading
    (``PipelineCache``), the service's parameter resolution and ``runner.run_job`` (generation + mp4),
    after one warm-up generation, as the service had its warm-up job."""
    import torch

    from wan_serve.config import ServeConfig
    from wan_serve.runner import run_job
    from wan_serve.service import ModelCatalog, resolve_params
    from wan_serve.worker import PipelineCache, resolve_dtype

    if threads is not None:
        torch.set_num_threads(threads)
    catalog, config = ModelCatalog([]), ServeConfig()
    pipe = PipelineCache("cpu", resolve_dtype("float32", "cpu")).get(catalog.spec(catalog.names()[0]))
    settings = [resolve_params(catalog, config, job_params(i, steps, frames))[1] for i in range(-1, jobs)]
    run_job(pipe, settings[0])
    start = time.perf_counter()
    for params in settings[1:]:
        run_job(pipe, params)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--poll", type=float, default=1.0,
                        help="seconds between a client's status checks (1 s: the SDK's poll default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server and the loop")
    parser.add_argument("--worker-process", action="store_true",
                        help="run the worker as a `wan worker` process beside `wan serve --workers 0`")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain loop (no ratio)")
    args = parser.parse_args()
    if args.jobs < 1 or args.clients < 1 or args.clients > args.jobs:
        raise SystemExit(f"need 1 <= --clients ({args.clients}) <= --jobs ({args.jobs})")
    if not WAN.exists():
        raise SystemExit(f"no `wan` command beside {sys.executable}: run `make install`")

    with tempfile.TemporaryDirectory(prefix="wan-serve-load-") as tmp:
        env = dict(os.environ)
        if args.threads is not None:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        server = Server(Path(tmp), env, args.worker_process)
        try:
            rss_before = server.rss()
            with httpx.Client(base_url=server.url, timeout=60) as client:
                first = client.post("/v1/videos", json=job_params(-1, args.steps, args.frames))
                wait_done(client, first.raise_for_status().json()["id"], 0.1)
            rss_first = server.rss()
            load_service = os.getloadavg()[0]
            rss_half = [0]
            latencies, total, ids = run_clients(server.url, args.jobs, args.clients, args.steps, args.frames,
                                                args.poll, lambda: rss_half.__setitem__(0, server.rss()))
            rss_end = server.rss()
            load_service = max(load_service, os.getloadavg()[0])
            good = check_videos(server.url, ids)
        finally:
            server.stop()
    load_loop = os.getloadavg()[0]
    loop = None if args.no_baseline else baseline(args.jobs, args.steps, args.frames, args.threads)
    load_loop = max(load_loop, os.getloadavg()[0])

    mib = 1 / 2**20
    print(f"{args.jobs} jobs from {args.clients} clients; tiny model, {args.frames} frames, {args.steps} steps; "
          f"{os.cpu_count()} CPUs, torch threads {args.threads or 'default'}; worker "
          f"{'process' if args.worker_process else 'thread'}; {good}/{len(ids)} results are mp4")
    print(f"submit latency p50 {percentile(latencies, 0.5) * 1e3:.1f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1e3:.1f} ms (mean {statistics.mean(latencies) * 1e3:.1f} ms)")
    print(f"service: {total:.1f} s for {args.jobs} jobs = {args.jobs / total * 60:.1f} jobs/min "
          f"(1-min load average up to {load_service:.1f})")
    if loop is not None:
        print(f"plain loop: {loop:.1f} s = {args.jobs / loop * 60:.1f} jobs/min (1-min load average up to "
              f"{load_loop:.1f}); service / loop = {total / loop:.3f} (goal <= 1.05)")
    print(f"server RSS: before {rss_before * mib:.0f} MiB, after the first job {rss_first * mib:.0f} MiB, "
          f"half-way {rss_half[0] * mib:.0f} MiB, at the end {rss_end * mib:.0f} MiB (growth after the first job "
          f"{(rss_end - rss_first) * mib:+.0f} MiB, over the second half {(rss_end - rss_half[0]) * mib:+.0f} MiB)")


if __name__ == "__main__":
    main()
