"""JobStore on SQLite: atomic claims across threads, leases and their expiry, the durability rule
(completed implies a video, written in the same transaction), cancellation, idempotency, listing, expiry."""

from __future__ import annotations

import os
import time

import pytest

from serve.jobs_support import at_once, open_concurrently
from wan_serve.store import MAX_REQUEUES, JobStore


def _fields(i: int = 0, model: str = "m") -> dict:
    return dict(model=model, prompt=f"prompt {i}", params={"i": i}, size="32x32", seconds="0.33", num_frames=5)


@pytest.fixture
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", retention_seconds=100)
    yield s
    s.close()


def test_two_threads_claiming_never_get_the_same_job(store) -> None:
    ids = {store.create(_fields(i)).id for i in range(24)}
    claimed: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    workers = list(claimed)

    def claim_all(n: int) -> None:
        worker = workers[n]
        while (job := store.claim(worker, ["m"], 60)) is not None:
            claimed[worker].append(job.id)

    at_once(len(workers), claim_all)
    every = [job_id for jobs in claimed.values() for job_id in jobs]
    assert sorted(every) == sorted(ids)  # each job exactly once
    assert all(store.get(i).status == "in_progress" for i in ids)


def test_claim_takes_the_oldest_job_of_the_worker_models(store) -> None:
    other = store.create(_fields(0, "other"))
    first, second = store.create(_fields(1)), store.create(_fields(2))
    assert store.queue_position(first) == 2 and store.queue_position(second) == 3  # "other" is ahead of both
    job = store.claim("w", ["m"], 60)
    assert job.id == first.id and job.worker_id == "w" and job.started_at is not None
    assert store.claim("w", ["m"], 60).id == second.id
    assert store.claim("w", ["m"], 60) is None and store.get(other.id).status == "queued"
    assert store.queue_position(store.get(first.id)) is None


def test_an_expired_lease_is_requeued_and_the_old_worker_loses_the_job(store) -> None:
    job = store.create(_fields())
    assert store.claim("dead", ["m"], 0.05).id == job.id
    time.sleep(0.1)
    again = store.claim("alive", ["m"], 60)
    assert again.id == job.id and again.attempts == 1 and again.worker_id == "alive"
    assert store.heartbeat(job.id, "dead", 50, 60) is False
    assert store.complete(job.id, "dead", os.urandom(64)) is False  # a late result is dropped
    assert store.get_blob(job.id, "video") is None
    video = os.urandom(128)
    assert store.heartbeat(job.id, "alive", 40, 60) is True and store.get(job.id).progress == 40
    assert store.complete(job.id, "alive", video) is True
    done = store.get(job.id)
    assert (done.status, done.progress, store.get_blob(job.id, "video")) == ("completed", 100, video)
    assert done.expires_at == done.completed_at + 100


def test_a_job_whose_workers_keep_dying_fails(store) -> None:
    job = store.create(_fields())
    for attempt in range(MAX_REQUEUES + 1):
        assert store.claim(f"w{attempt}", ["m"], 0.01).id == job.id
        time.sleep(0.03)
    assert store.claim("last", ["m"], 60) is None
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"


def test_completed_always_has_its_video(store, monkeypatch) -> None:
    job = store.create(_fields())
    store.claim("w", ["m"], 60)

    class Unstorable:  # the blob insert fails inside the transaction: the status must not change
        pass

    with pytest.raises(Exception):
        store.complete(job.id, "w", Unstorable())
    after = store.get(job.id)
    assert after.status == "in_progress" and store.get_blob(job.id, "video") is None
    assert store.complete(job.id, "w", b"\x00mp4" + os.urandom(32)) is True
    for listed in store.list(100)[0]:
        if listed.status == "completed":
            assert store.get_blob(listed.id, "video")


def test_cancel_a_queued_job_at_once_and_a_running_one_through_its_worker(store) -> None:
    queued = store.create(_fields(0), inputs={"input_reference": b"png"})
    running = store.create(_fields(1))
    assert store.claim("w", ["m"], 60).id == queued.id
    store.claim("w", ["m"], 60)  # now both are running; make a fresh queued one
    waiting = store.create(_fields(2))
    assert store.cancel(waiting.id).status == "cancelled"
    assert store.claim("w", ["m"], 60) is None  # a cancelled job is never claimed
    marked = store.cancel(running.id)
    assert marked.status == "in_progress" and marked.cancel_requested
    assert store.cancel(running.id) is None  # already being cancelled
    assert store.heartbeat(running.id, "w", 10, 60) is False  # the worker learns it must stop
    assert store.fail(running.id, "w", "cancelled", "stopped") is False
    assert store.get(running.id).status == "cancelled"
    assert store.complete(queued.id, "w", b"video") is True
    assert [j.id for j in store.list(10)[0]] == [queued.id]  # cancelled jobs are not listed
    assert store.counts() == {"queued": 0, "in_progress": 0, "completed": 1, "failed": 0, "cancelled": 2}


def test_delete_removes_finished_jobs_only(store) -> None:
    job = store.create(_fields(), inputs={"input_reference": b"img"})
    assert store.delete(job.id) is False  # still queued
    store.claim("w", ["m"], 60)
    store.complete(job.id, "w", b"video")
    assert store.delete(job.id) is True
    assert store.get(job.id) is None and store.get_blob(job.id, "input_reference") is None


def test_idempotency_key_returns_the_first_job_even_under_concurrency(store) -> None:
    results = []
    at_once(4, lambda _n: results.append(store.create(_fields(), idempotency_key="key-1").id))
    assert len(set(results)) == 1 and store.counts()["queued"] == 1
    assert store.create(_fields(), idempotency_key="key-2").id != results[0]


def test_list_pages_in_both_orders(store) -> None:
    ids = [store.create(_fields(i)).id for i in range(5)]
    page, more = store.list(2)
    assert [j.id for j in page] == ids[:-3:-1] and more
    page, more = store.list(2, after=page[-1].id)
    assert [j.id for j in page] == [ids[2], ids[1]] and more
    page, more = store.list(10, after=ids[1])
    assert [j.id for j in page] == [ids[0]] and not more
    page, more = store.list(3, order="asc")
    assert [j.id for j in page] == ids[:3] and more
    with pytest.raises(KeyError):
        store.list(2, after="video_unknown")


def test_expire_removes_old_results_but_keeps_the_rows(store) -> None:
    old, new = store.create(_fields(0)), store.create(_fields(1))
    for job in (old, new):
        store.claim("w", ["m"], 60)
        store.complete(job.id, "w", os.urandom(16))
    cutoff = store.get(old.id).expires_at
    assert store.expire(now=cutoff - 1) == 0
    assert store.expire(now=cutoff + 1) == 2  # both finished in the same second
    assert store.get_blob(old.id, "video") is None and store.get(old.id).status == "completed"


def test_release_puts_a_stopping_worker_jobs_back(store) -> None:
    job = store.create(_fields())
    store.claim("w", ["m"], 60)
    assert store.release("w") == 1
    back = store.get(job.id)
    assert back.status == "queued" and back.worker_id is None
    assert store.claim("other", ["m"], 60).id == job.id


def test_stores_opening_an_empty_database_at_once_all_start(tmp_path) -> None:
    """Serve and its workers may open a new database together: every opener starts and the tables work."""
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'jobs-{round_}.db'}"
        open_concurrently(url)
        store = JobStore(url)
        assert store.get(store.create(_fields(round_)).id).status == "queued"
        store.close()
