"""Several machines, one PostgreSQL queue: `wan serve --workers 0` takes jobs, two `wan worker` processes run
them.

Proves issue 27's multi-machine rules on a real PostgreSQL 15 (conftest.py): the claim is atomic (many
claimers at once never get the same job), every job is done exactly once by one of the two workers and
none is lost, each result is a playable mp4 of the asked frame count, and a worker killed mid-job loses its
job to the other worker once its lease expires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from serve.jobs_support import (WanProcess, WanProcesses, at_once, attempts_after_one_run, decoded_frames,
                                expire_leases, open_concurrently, submit, wait_until_finished)
from wan_serve.store import JobStore

LEASE = "3"  # seconds, for the workers of the process tests (renewed every second)


def _job_fields(i: int) -> dict:
    """The columns of a queued tiny-model job, as the service would hand them to JobStore.create."""
    return {"model": "tiny-shapes", "prompt": f"a red circle, clip {i}", "params": {}, "size": "32x32",
            "seconds": "0.3", "num_frames": 5}


def _claim_concurrently(url: str, claimers: int = 8) -> dict[str, list[str]]:
    """``claimers`` threads, each with its own JobStore (own connection pool), released at once by a barrier,
    claim until the queue is empty; returns the ids each claimer got, by claimer name."""
    stores = [JobStore(url) for _ in range(claimers)]
    claimed: dict[str, list[str]] = {f"claimer-{n}": [] for n in range(claimers)}

    def claim_all(n: int) -> None:
        while (job := stores[n].claim(f"claimer-{n}", ["tiny-shapes"], 60.0)) is not None:
            claimed[f"claimer-{n}"].append(job.id)

    try:
        at_once(claimers, claim_all)
    finally:
        for store in stores:
            store.close()
    return claimed


def _check_each_claimed_once(store: JobStore, claimed: dict[str, list[str]], ids: list[str], attempts: int) -> None:
    every_claim = [job_id for got in claimed.values() for job_id in got]
    assert len(every_claim) == len(set(every_claim)), "a job was claimed twice"
    assert sorted(every_claim) == sorted(ids), "a job was never claimed"
    assert sum(1 for got in claimed.values() if got) >= 2, claimed  # the claimers really ran side by side
    for name, got in claimed.items():
        for job_id in got:
            job = store.get(job_id)
            assert (job.status, job.worker_id, job.attempts) == ("in_progress", name, attempts)


def test_stores_opening_an_empty_database_at_once_all_start(postgres_server):
    """Creating the tables is serialised: the openers that lose the race find them made instead of failing
    on a duplicate type (seen when serve and two workers started together). Repeated on fresh databases,
    since one round can miss the race."""
    for _ in range(5):
        url = postgres_server.create_database()
        open_concurrently(url)
        store = JobStore(url)
        job_id = store.create(_job_fields(0)).id
        assert store.get(job_id).status == "queued"
        store.close()


def test_claim_is_atomic_under_concurrency(postgres_url):
    """Eight claimers with their own connection pools, released at once, split 40 jobs with no job twice."""
    store = JobStore(postgres_url)
    one_run = store.create(_job_fields(-1), None) and store.claim("probe", ["tiny-shapes"], 60.0).attempts
    ids = [store.create(_job_fields(i), None).id for i in range(40)]  # after the probe: it is claimed already
    _check_each_claimed_once(store, _claim_concurrently(postgres_url), ids, one_run)
    assert store.counts()["in_progress"] == len(ids) + 1 and store.counts()["queued"] == 0
    store.close()


def test_expired_leases_are_reclaimed_once_under_concurrency(postgres_url):
    """24 jobs whose claimer went silent: eight claimers at once re-queue and take each exactly once."""
    store = JobStore(postgres_url)
    ids = [store.create(_job_fields(i), None).id for i in range(24)]
    first_runs = []
    while (job := store.claim("gone", ["tiny-shapes"], 600.0)) is not None:
        first_runs.append((job.id, job.attempts))
    one_run = first_runs[0][1]
    assert sorted(first_runs) == sorted((job_id, one_run) for job_id in ids)  # each claimed once
    expire_leases(store, "gone")
    _check_each_claimed_once(store, _claim_concurrently(postgres_url), ids, one_run + 1)
    store.close()


def test_expired_lease_moves_the_job_to_another_claimer(postgres_url):
    """A claimer that stops heartbeating loses its job after the lease: the next claim gets it (one attempt
    more), and the first one can neither heartbeat nor complete it any more."""
    store = JobStore(postgres_url)
    job_id = store.create(_job_fields(0), None).id
    first = store.claim("gone", ["tiny-shapes"], 600.0)
    assert first.id == job_id and first.status == "in_progress"
    assert store.claim("other", ["tiny-shapes"], 600.0) is None  # leased: nothing to take yet
    expire_leases(store, "gone")
    second = store.claim("other", ["tiny-shapes"], 30.0)
    assert second is not None and second.id == job_id
    assert (second.worker_id, second.attempts, second.status) == ("other", first.attempts + 1, "in_progress")
    assert store.heartbeat(job_id, "gone", 50, 30.0) is False
    assert store.complete(job_id, "gone", b"not the real video") is False
    assert store.get_blob(job_id, "video") is None
    assert store.complete(job_id, "other", b"\x00mp4") is True
    assert store.get(job_id).status == "completed" and store.get_blob(job_id, "video") == b"\x00mp4"
    store.close()


@dataclass
class Cluster:
    """`wan serve --workers 0` and two `wan worker` processes ("wa", "wb") on one PostgreSQL database."""

    db_url: str
    server: WanProcess
    workers: dict[str, WanProcess]


@pytest.fixture(scope="module")
def cluster(postgres_server, tmp_path_factory) -> Iterator[Cluster]:
    """Started once for this module's two process tests (the second kills a worker, so it runs last);
    the three processes start side by side, and short leases (3 s) make a dead worker's job move soon."""
    db_url = postgres_server.create_database()
    procs = WanProcesses(tmp_path_factory.mktemp("pg-cluster"))
    try:
        server = procs.serve("--db", db_url, "--workers", "0", wait=False)
        workers = {name: procs.worker(db_url, "--lease-seconds", LEASE, worker_id=name, wait=False)
                   for name in ("wa", "wb")}
        for proc in (server, *workers.values()):
            proc.wait_ready()
        yield Cluster(db_url, server, workers)
    finally:
        procs.stop_all()


def test_two_worker_processes_share_the_queue(cluster, tmp_path):
    """12 jobs over HTTP, run by two `wan worker` processes: each done once, none lost, all playable."""
    one_run = attempts_after_one_run(tmp_path)
    store = JobStore(cluster.db_url)
    with httpx.Client(base_url=cluster.server.url, timeout=30) as client:
        ids = [submit(client, f"a blue square moving right, clip {i}", seed=i) for i in range(12)]
        assert len(set(ids)) == 12
        finished = wait_until_finished(client, ids, timeout=120)
        assert {video["status"] for video in finished.values()} == {"completed"}, finished
        done_by: dict[str, str] = {}
        for job_id in ids:
            job = store.get(job_id)
            assert job.attempts == one_run, f"{job_id} ran more than once: attempts {job.attempts}"
            done_by[job_id] = job.worker_id
            content = client.get(f"/v1/videos/{job_id}/content")
            assert content.status_code == 200 and content.headers["content-type"].startswith("video/mp4")
            assert decoded_frames(content.content) == (5, 32, 32)
    assert set(done_by.values()) == {"wa", "wb"}, f"one worker did everything: {done_by}"
    # Each worker's own log names exactly the jobs the store says it did: no job ran in both.
    logs = {name: worker.log() for name, worker in cluster.workers.items()}
    for job_id, worker_id in done_by.items():
        mentioned = [name for name, text in logs.items() if job_id in text]
        assert mentioned == [worker_id], f"{job_id}: store says {worker_id}, named in the logs of {mentioned}"
    counts = store.counts()
    assert (counts["completed"], counts["queued"], counts["in_progress"]) == (12, 0, 0), counts
    store.close()


def test_killed_worker_loses_its_job_to_the_other(cluster):
    """SIGKILL the worker running a job: once its lease runs out the other worker takes it and finishes."""
    store = JobStore(cluster.db_url)
    with httpx.Client(base_url=cluster.server.url, timeout=30) as client:
        # 40 steps of 17 frames at 64x64 (~3 s on one core): surely mid-way when the kill lands.
        job_id = submit(client, "a green triangle moving up", num_inference_steps=40, num_frames=17, size="64x64")
        deadline = time.monotonic() + 60
        while (job := store.get(job_id)).status != "in_progress" or job.progress < 1:
            assert job.status in ("queued", "in_progress") and time.monotonic() < deadline, job
            time.sleep(0.02)
        victim, one_run = job.worker_id, job.attempts
        survivor = ({"wa", "wb"} - {victim}).pop()
        cluster.workers[victim].kill()
        killed_at = time.monotonic()
        assert store.get(job_id).status == "in_progress"  # nobody may take it before the lease expires

        video = wait_until_finished(client, [job_id], timeout=90)[job_id]
        assert video["status"] == "completed", video
        assert time.monotonic() - killed_at >= float(LEASE) - 1  # the survivor waited for the lease
        job = store.get(job_id)
        assert (job.worker_id, job.attempts) == (survivor, one_run + 1)
        assert decoded_frames(client.get(f"/v1/videos/{job_id}/content").content) == (17, 64, 64)
    assert job_id in cluster.workers[survivor].log()
    store.close()
