"""Helpers of the process-level serve tests (test_postgres.py, test_restart.py): submit, wait, decode."""

from __future__ import annotations

import io
import time

import av
import httpx

TINY = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}  # a fast tiny-model job (4k+1 frames)


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


def attempts_after_one_run(folder) -> int:
    """The ``attempts`` a job shows after exactly one claim, read from a scratch SQLite store: the tests
    compare against it so that they prove "ran once" / "ran twice" whether the store counts runs or re-runs."""
    from wan_serve.store import JobStore

    store = JobStore(f"sqlite:///{folder}/attempts-probe.db")
    try:
        store.create({"model": "probe", "prompt": "probe", "params": {}, "size": "32x32", "seconds": "1",
                      "num_frames": 5}, None)
        return store.claim("probe-worker", ["probe"], 60.0).attempts
    finally:
        store.close()
