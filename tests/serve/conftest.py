"""Shared fixtures for the wan-serve tests: a real PostgreSQL 15 server and real `wan serve` / `wan worker`
processes.

The PostgreSQL server is started once per session by ``initdb`` + ``pg_ctl`` in a temp folder, as an
unprivileged user when the tests run as root (``initdb`` refuses root), with trust auth on 127.0.0.1 and a
unix socket beside its data; each test that needs it gets a fresh database. Missing binaries fail the tests
with what to install (``tools/ensure_test_system.sh`` installs them in ``make test``): they are never skipped.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from serve.jobs_support import WanProcesses
from wan_serve.service import ModelCatalog

PG_BINDIR = Path(os.environ.get("WAN_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
PG_USER = "nobody"  # used when the tests run as root; created when missing
INSTALL_HINT = (
    "install the PostgreSQL 15 server (Debian/Ubuntu: `apt-get install postgresql-15`; "
    "`make test` does it through tools/ensure_test_system.sh), or point WAN_TEST_PG_BINDIR at the folder "
    "holding initdb and pg_ctl"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-chars:]


def _pg_account() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: None when not root (run as ourselves), else PG_USER, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


@dataclass
class PostgresServer:
    """A running PostgreSQL server: ``url(db)`` is the SQLAlchemy/`--db` URL of one of its databases."""

    port: int
    root: Path
    account: tuple[int, int] | None
    user: str = "postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.account is not None:
            kwargs = {"user": self.account[0], "group": self.account[1], "extra_groups": []}
        return subprocess.run(list(args), capture_output=True, text=True, cwd=self.root,
                              env={**os.environ, "HOME": str(self.root)}, timeout=60, **kwargs)

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = "wan_" + secrets.token_hex(6)
        done = self._run(str(PG_BINDIR / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                         "-U", self.user, name)
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {done.stderr.strip()}")
        return self.url(name)

    def start(self) -> None:
        data = self.root / "data"
        init = self._run(str(PG_BINDIR / "initdb"), "-D", str(data), "-A", "trust", "-U", self.user,
                         "-E", "UTF8", "--no-sync")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        log = self.root / "postgres.log"
        started = self._run(str(PG_BINDIR / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                            "-o", options, "start")
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({started.returncode}): {started.stderr.strip()}\n"
                               f"server log:\n{_tail(log)}")

    def stop(self) -> None:
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            self._run(str(PG_BINDIR / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL 15 server for the session, stopped and removed at the end even when a test fails."""
    missing = [name for name in ("initdb", "pg_ctl", "createdb") if not (PG_BINDIR / name).exists()]
    if missing:
        pytest.fail(f"PostgreSQL server binaries {missing} not found in {PG_BINDIR}: {INSTALL_HINT}",
                    pytrace=False)
    account = _pg_account()
    # Under /tmp (world-traversable), not pytest's per-user 0700 folder: the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="wan-pg-"))
    if account is not None:
        os.chown(root, *account)
    server = PostgresServer(port=free_port(), root=root, account=account)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    """The catalog of the embedded tiny model only, one per test module (test_api.py, test_page.py)."""
    return ModelCatalog([])


@pytest.fixture
def wan_processes(tmp_path: Path) -> Iterator[WanProcesses]:
    """Factory for `wan serve` / `wan worker` subprocesses; all of them are stopped when the test ends."""
    procs = WanProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
