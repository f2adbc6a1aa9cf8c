"""The durable job store: one SQLAlchemy schema on SQLite (one machine) or PostgreSQL (many).

Jobs, their uploaded inputs and their finished videos all live in the database, so a worker needs only
the URL and the model files. Every state change is one transaction:

- ``create`` commits the job (and its input) before the API answers;
- ``claim`` re-queues jobs whose lease expired, then takes the oldest queued job atomically
  (PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite: every transaction is ``BEGIN IMMEDIATE``,
  so one writer at a time);
- ``complete`` writes the video and the status together, and only while the caller still holds the
  lease: a job is never reported completed without its video.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (Boolean, Column, Float, Integer, LargeBinary, MetaData, String, Table, Text, and_, create_engine,
                        delete, event, func, insert, select, update)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError

logger = logging.getLogger(__name__)

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed")
SCHEMA_LOCK_KEY = 0x57414E5F4A4F4253  # "WAN_JOBS": the PostgreSQL advisory lock held while creating tables
MAX_REQUEUES = 3  # a job whose worker died this many times fails ("worker_lost") instead of killing more

metadata = MetaData()
jobs = Table(
    "jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # submission order (queue and list order)
    Column("id", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False, index=True),
    Column("model", String(512), nullable=False),
    Column("prompt", Text, nullable=False, default=""),
    Column("params", Text, nullable=False, default="{}"),
    Column("size", String(32), nullable=False),
    Column("seconds", String(32), nullable=False),
    Column("num_frames", Integer, nullable=False),
    Column("progress", Integer, nullable=False, default=0),
    Column("created_at", Integer, nullable=False),
    Column("started_at", Integer),
    Column("completed_at", Integer),
    Column("expires_at", Integer),
    Column("error", Text),
    Column("idempotency_key", String(255), unique=True),
    Column("request_hash", String(64)),
    Column("worker_id", String(255)),
    Column("lease_expires_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
)
blobs = Table(
    "blobs", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)


@dataclass(frozen=True)
class Job:
    """A snapshot of one ``jobs`` row (``params`` and ``error`` decoded from their JSON text)."""

    seq: int
    id: str
    status: str
    model: str
    prompt: str
    params: dict[str, Any]
    size: str
    seconds: str
    num_frames: int
    progress: int
    created_at: int
    started_at: int | None
    completed_at: int | None
    expires_at: int | None
    error: dict[str, str] | None
    idempotency_key: str | None
    request_hash: str | None
    worker_id: str | None
    lease_expires_at: float | None
    attempts: int
    cancel_requested: bool

    @property
    def active(self) -> bool:
        """Queued or running, and not being cancelled (what the API shows as unfinished)."""
        return self.status in ("queued", "in_progress") and not self.cancel_requested


def _job(row: Any) -> Job:
    values = dict(row._mapping)
    values["params"] = json.loads(values["params"] or "{}")
    values["error"] = json.loads(values["error"]) if values["error"] else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**{f.name: values[f.name] for f in fields(Job)})


def new_job_id() -> str:
    """A random id (``video_`` + 24 hex digits): unguessable, and never derived from client input."""
    return "video_" + secrets.token_hex(12)


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    """SQLite in WAL mode (readers never wait for the writer); with ``immediate`` every transaction is
    ``BEGIN IMMEDIATE`` (the write lock up front: two claims never interleave), else a plain ``BEGIN``."""
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")  # first: switching to WAL itself waits on other openers
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class JobStore:
    """Jobs and their blobs in the database at ``url`` (tables created when missing).

    ``retention_seconds`` sets each finished job's ``expires_at``, after which :meth:`expire` removes
    its video and input.
    """

    def __init__(self, url: str, retention_seconds: int = 24 * 3600) -> None:
        self.url = url
        self.retention_seconds = retention_seconds
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:  # writes take the lock up front; reads (self.reader) never take it
            self._sqlite_folder(url)
            self.engine, self.reader = _sqlite_engine(url, immediate=True), _sqlite_engine(url, immediate=False)
        else:
            self.engine = self.reader = create_engine(url, pool_pre_ping=True)
        self._create_tables()

    def _create_tables(self) -> None:
        """Create the missing tables in one transaction that holds a lock, so processes started together on
        an empty database (serve and its workers) do not both try: PostgreSQL checks-then-creates without
        one and the loser fails on a duplicate type. SQLite's ``BEGIN IMMEDIATE`` already is that lock;
        PostgreSQL takes a transaction advisory lock, released at commit, after which the tables exist."""
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
            metadata.create_all(connection)

    @staticmethod
    def _sqlite_folder(url: str) -> None:
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        self.reader.dispose()

    # -- creating and reading -------------------------------------------------------------------

    def create(self, fields: dict[str, Any], idempotency_key: str | None = None,
               inputs: dict[str, bytes] | None = None) -> Job:
        """Insert a queued job (``fields``: model, prompt, params, size, seconds, num_frames, and
        optionally request_hash) with its input blobs, in one transaction. With an ``idempotency_key``
        already used, nothing is inserted and the existing job is returned (the API compares bodies)."""
        if idempotency_key is not None:
            existing = self.by_idempotency_key(idempotency_key)
            if existing is not None:
                return existing
        row = dict(fields)
        row["params"] = json.dumps(row.get("params") or {}, sort_keys=True)
        row.update(id=new_job_id(), status="queued", progress=0, created_at=int(time.time()), attempts=0,
                   cancel_requested=False, idempotency_key=idempotency_key)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(jobs).values(**row))
                for kind, data in (inputs or {}).items():
                    conn.execute(insert(blobs).values(job_id=row["id"], kind=kind, data=data))
        except IntegrityError:
            existing = self.by_idempotency_key(idempotency_key) if idempotency_key is not None else None
            if existing is None:
                raise
            return existing  # the same key inserted by a concurrent request
        job = self.get(row["id"])
        assert job is not None
        return job

    def by_idempotency_key(self, key: str) -> Job | None:
        """The job created with Idempotency-Key ``key``, or None."""
        with self.reader.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.idempotency_key == key)).first()
        return _job(row) if row is not None else None

    def get(self, job_id: str) -> Job | None:
        """The job ``job_id``, or None."""
        with self.reader.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row) if row is not None else None

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[Job], bool]:
        """Visible jobs (not cancelled) in submission order ``order`` ("asc"/"desc"), starting after the
        job ``after``; returns (at most ``limit`` jobs, whether more follow)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        query = select(jobs).where(jobs.c.status != "cancelled", jobs.c.cancel_requested.is_(False))
        with self.reader.connect() as conn:
            if after is not None:
                seq = conn.execute(select(jobs.c.seq).where(jobs.c.id == after)).scalar()
                if seq is None:
                    raise KeyError(after)
                query = query.where(jobs.c.seq > seq if order == "asc" else jobs.c.seq < seq)
            query = query.order_by(jobs.c.seq.asc() if order == "asc" else jobs.c.seq.desc()).limit(limit + 1)
            rows = conn.execute(query).all()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def get_blob(self, job_id: str, kind: str) -> bytes | None:
        """The blob ``kind`` of ``job_id``, or None."""
        with self.reader.connect() as conn:
            return conn.execute(select(blobs.c.data).where(blobs.c.job_id == job_id, blobs.c.kind == kind)).scalar()

    def counts(self) -> dict[str, int]:
        """Number of jobs in each status (every status present, zeros included)."""
        with self.reader.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        found = {status: count for status, count in rows}
        return {status: int(found.get(status, 0)) for status in STATUSES}

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None unless ``job`` is queued."""
        if job.status != "queued":
            return None
        with self.reader.connect() as conn:
            ahead = conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.status == "queued", jobs.c.seq < job.seq)).scalar()
        return int(ahead) + 1

    # -- workers --------------------------------------------------------------------------------

    def claim(self, worker_id: str, models: Iterable[str], lease_seconds: float) -> Job | None:
        """The oldest queued job of ``models``, now in_progress and leased to ``worker_id`` for
        ``lease_seconds``; None when there is none. Expired leases are re-queued first."""
        models = list(models)
        now = time.time()
        with self.engine.begin() as conn:
            self._requeue_expired(conn, now)
            query = (select(jobs.c.seq).where(jobs.c.status == "queued", jobs.c.model.in_(models))
                     .order_by(jobs.c.seq).limit(1).with_for_update(skip_locked=True))
            seq = conn.execute(query).scalar()
            if seq is None:
                return None
            conn.execute(update(jobs).where(jobs.c.seq == seq).values(
                status="in_progress", worker_id=worker_id, lease_expires_at=now + lease_seconds,
                started_at=int(now), progress=0))
            row = conn.execute(select(jobs).where(jobs.c.seq == seq)).first()
        return _job(row)

    def _requeue_expired(self, conn: Connection, now: float) -> None:
        expired = and_(jobs.c.status == "in_progress", jobs.c.lease_expires_at < now)
        lost = dict(worker_id=None, lease_expires_at=None)
        conn.execute(update(jobs).where(expired, jobs.c.cancel_requested.is_(True)).values(
            status="cancelled", completed_at=int(now), **lost))
        conn.execute(update(jobs).where(expired, jobs.c.attempts >= MAX_REQUEUES).values(
            status="failed", completed_at=int(now), expires_at=int(now) + self.retention_seconds,
            error=json.dumps({"code": "worker_lost", "message": f"the job's worker stopped {MAX_REQUEUES + 1} "
                              "times before finishing it"}), **lost))
        requeued = conn.execute(update(jobs).where(expired).values(
            status="queued", progress=0, started_at=None, attempts=jobs.c.attempts + 1, **lost))
        if requeued.rowcount:
            logger.warning("re-queued %d job(s) whose worker's lease expired", requeued.rowcount)

    def heartbeat(self, job_id: str, worker_id: str, progress: int | None = None,
                  lease_seconds: float = 60.0) -> bool:
        """Renew the lease (and record ``progress``); False when the worker must stop: the lease was
        lost to another worker, or a cancellation was requested."""
        values: dict[str, Any] = dict(lease_expires_at=time.time() + lease_seconds)
        if progress is not None:
            values["progress"] = max(0, min(99, int(progress)))
        with self.engine.begin() as conn:
            result = conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == "in_progress",
                jobs.c.cancel_requested.is_(False)).values(**values))
        return result.rowcount == 1

    def _finish(self, job_id: str, worker_id: str, status: str, video: bytes | None = None,
                error: dict[str, str] | None = None) -> bool:
        """Finish a job this worker holds; a job being cancelled becomes ``cancelled`` instead."""
        now = int(time.time())
        held = and_(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == "in_progress")
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.cancel_requested).where(held).with_for_update()).first()
            if row is None:
                logger.warning("job %s is no longer leased to %s; its result is dropped", job_id, worker_id)
                return False
            if row.cancel_requested:
                conn.execute(update(jobs).where(held).values(status="cancelled", completed_at=now,
                                                             lease_expires_at=None))
                conn.execute(delete(blobs).where(blobs.c.job_id == job_id))
                return False
            if video is not None:
                conn.execute(delete(blobs).where(blobs.c.job_id == job_id, blobs.c.kind == "video"))
                conn.execute(insert(blobs).values(job_id=job_id, kind="video", data=video))
            conn.execute(update(jobs).where(held).values(
                status=status, completed_at=now, expires_at=now + self.retention_seconds, lease_expires_at=None,
                progress=100 if status == "completed" else jobs.c.progress,
                error=json.dumps(error) if error is not None else None))
        return True

    def complete(self, job_id: str, worker_id: str, video: bytes) -> bool:
        """Store the mp4 and mark the job completed, in one transaction, if ``worker_id`` still holds it."""
        return self._finish(job_id, worker_id, "completed", video=video)

    def fail(self, job_id: str, worker_id: str, code: str, message: str) -> bool:
        """Mark the job failed with ``{"code", "message"}`` if ``worker_id`` still holds it."""
        return self._finish(job_id, worker_id, "failed", error={"code": code, "message": message})

    def release(self, worker_id: str) -> int:
        """Put the jobs ``worker_id`` holds back in the queue (a worker stopping cleanly); their count."""
        with self.engine.begin() as conn:
            result = conn.execute(update(jobs).where(
                jobs.c.worker_id == worker_id, jobs.c.status == "in_progress", jobs.c.cancel_requested.is_(False)
            ).values(status="queued", worker_id=None, lease_expires_at=None, progress=0, started_at=None))
        return result.rowcount

    # -- cancelling, deleting, expiring -----------------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """Cancel an unfinished job: a queued one at once, a running one by asking its worker to stop
        (``cancel_requested``; the worker makes it ``cancelled``). None when there is no such active job."""
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
            if row is None or row.status not in ("queued", "in_progress") or row.cancel_requested:
                return None
            if row.status == "queued":
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    status="cancelled", completed_at=int(time.time())))
                conn.execute(delete(blobs).where(blobs.c.job_id == job_id))
            else:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True))
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row)

    def delete(self, job_id: str) -> bool:
        """Remove a finished (completed, failed or cancelled) job and its blobs; False if there is none."""
        with self.engine.begin() as conn:
            result = conn.execute(delete(jobs).where(jobs.c.id == job_id,
                                                     jobs.c.status.in_((*FINISHED, "cancelled"))))
            if result.rowcount:
                conn.execute(delete(blobs).where(blobs.c.job_id == job_id))
        return bool(result.rowcount)

    def expire(self, now: float | None = None) -> int:
        """Remove the videos and inputs of finished jobs past ``expires_at`` (their rows stay, so the API
        can say the result expired) and cancelled jobs older than the retention; returns the number of
        jobs whose files were removed."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            ids = conn.execute(select(jobs.c.id).where(jobs.c.status.in_(FINISHED), jobs.c.expires_at <= now)).scalars().all()
            removed = 0
            if ids:
                removed = conn.execute(select(func.count(func.distinct(blobs.c.job_id))).where(
                    blobs.c.job_id.in_(ids))).scalar()
                conn.execute(delete(blobs).where(blobs.c.job_id.in_(ids)))
            conn.execute(delete(jobs).where(jobs.c.status == "cancelled",
                                            jobs.c.completed_at <= now - self.retention_seconds))
        return int(removed or 0)
