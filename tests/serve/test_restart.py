"""A `wan serve` killed with SIGKILL and started again on the same state finishes every job (issue 27).

One job is running and others are queued when the server dies; after the restart on the same --state-dir
(SQLite, the default store) every job completes, none is lost, none is ever reported completed without its
video, and the running one starts over (a second attempt).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from serve.jobs_support import attempts_after_one_run, decoded_frames, submit
from wan_serve import ServeConfig
from wan_serve.store import JobStore

LEASE = "3"  # seconds: the killed server's lease on its running job runs out this fast (renewed every second)


def _check_completed_have_videos(client: httpx.Client, ids: list[str]) -> dict[str, dict]:
    """GET every job; each one reported completed must serve its mp4 right away. Returns the objects."""
    videos = {}
    for job_id in ids:
        response = client.get(f"/v1/videos/{job_id}")
        assert response.status_code == 200, f"{job_id} lost: {response.status_code} {response.text}"
        video = videos[job_id] = response.json()
        assert video["status"] in ("queued", "in_progress", "completed"), video
        if video["status"] == "completed":
            content = client.get(f"/v1/videos/{job_id}/content")
            assert content.status_code == 200, f"{job_id} completed without its video: {content.text}"
            assert decoded_frames(content.content)[0] == video["num_frames"]
    return videos


def test_sigkill_and_restart_finish_every_job(tmp_path: Path, wan_processes):
    """Kill -9 with one job running and four queued (the last submitted just before the kill), restart on
    the same state: all five complete, each with its mp4 the moment it shows completed; only the running
    one ran twice. (--lease-seconds 3: with the default 60 s the restarted server would take the running
    job back only after a minute.)"""
    state = tmp_path / "state"
    first = wan_processes.serve("--lease-seconds", LEASE, state_dir=state, name="serve-1")
    with httpx.Client(base_url=first.url, timeout=30) as client:
        # A long job first (the one running at the kill), then short ones behind it in the queue.
        running = submit(client, "a yellow circle moving down", num_inference_steps=40, num_frames=17,
                         size="64x64", seed=1)
        queued = [submit(client, f"a red square, clip {i}", seed=10 + i) for i in range(3)]
        deadline = time.monotonic() + 60
        while (video := client.get(f"/v1/videos/{running}").json())["progress"] < 1:
            assert video["status"] in ("queued", "in_progress") and time.monotonic() < deadline, video
            time.sleep(0.05)
        states = {job_id: client.get(f"/v1/videos/{job_id}").json()["status"] for job_id in queued}
        assert video["status"] == "in_progress" and set(states.values()) == {"queued"}, (video, states)
        # The kill lands right after this 200: a job is committed before the API answers.
        queued.append(submit(client, "a purple circle, submitted last", seed=99))
    first.kill()

    ids = [running, *queued]
    second = wan_processes.serve("--lease-seconds", LEASE, state_dir=state, name="serve-2")
    with httpx.Client(base_url=second.url, timeout=30) as client:
        deadline = time.monotonic() + 150
        while True:
            videos = _check_completed_have_videos(client, ids)
            if all(video["status"] == "completed" for video in videos.values()):
                break
            assert time.monotonic() < deadline, videos
            time.sleep(0.2)
        listed = client.get("/v1/videos", params={"limit": 100}).json()
        assert sorted(item["id"] for item in listed["data"]) == sorted(ids)
        assert decoded_frames(client.get(f"/v1/videos/{running}/content").content) == (17, 64, 64)
    assert second.stop() == 0

    store = JobStore(ServeConfig(state_dir=str(state)).resolved_db_url())
    one_run = attempts_after_one_run(tmp_path)
    assert [store.get(job_id).attempts for job_id in queued] == [one_run] * len(queued)
    assert store.get(running).attempts == one_run + 1  # started over after the kill
    assert store.counts().get("completed") == len(ids)
    store.close()
