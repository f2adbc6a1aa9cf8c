"""``serve(config)``: store + models + API + page + worker threads under uvicorn; ``work(config)``: a worker
process on its own (``wan worker``), for more GPUs or machines sharing a PostgreSQL store.

Both stop cleanly on SIGTERM or Ctrl-C: the jobs their workers hold go back to the queue.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .api import create_app
from .config import ServeConfig
from .service import ModelCatalog
from .store import JobStore
from .worker import Worker

logger = logging.getLogger(__name__)

MAX_EXPIRE_INTERVAL = 60.0
GRACEFUL_STOP_SECONDS = 5  # open connections (a page following a job) get this long after a stop signal


def worker_devices(config: ServeConfig) -> list[str | None]:
    """The device of each in-process worker: ``config.device`` for all, except that several workers on a
    machine with as many GPUs (device unset or "cuda") get one GPU each. Each worker keeps its own
    pipelines, so workers sharing a device hold the models once each."""
    import torch

    count = config.workers
    if count > 1 and config.device in (None, "cuda") and torch.cuda.is_available() \
            and torch.cuda.device_count() >= count:
        return [f"cuda:{i}" for i in range(count)]
    return [config.device] * count


def _worker(config: ServeConfig, store: JobStore, catalog: ModelCatalog, device: str | None,
            worker_id: str | None = None, **extra: Any) -> Worker:
    return Worker(store, catalog, worker_id=worker_id, device=device, dtype=config.dtype,
                  lease_seconds=config.lease_seconds, lora_dir=config.resolved_lora_dir(),
                  models_dir=config.models_dir, poll_seconds=config.poll_seconds, **extra)


def _expire_loop(store: JobStore, stop: threading.Event, interval: float) -> None:
    """Remove expired results every ``interval`` seconds until ``stop``."""
    while not stop.wait(interval):
        try:
            removed = store.expire()
            if removed:
                logger.info("removed the results of %d expired job(s)", removed)
        except Exception:
            logger.exception("expiring old results failed; retrying later")


def serve(config: ServeConfig) -> None:
    """Run the server until SIGTERM/SIGINT (blocks). Logs "wan serve: listening on http://HOST:PORT" once
    it accepts connections and its workers have loaded the models."""
    import uvicorn

    config.check_bind()
    store = JobStore(config.resolved_db_url(), config.retention_seconds)
    catalog = ModelCatalog(config.models)
    app = create_app(config, store, catalog)
    from .page import mount_page

    mount_page(app, store, catalog, config)
    stop = threading.Event()
    workers = [_worker(config, store, catalog, device, wake=app.state.wake, metrics=app.state.metrics)
               for device in worker_devices(config)]
    threads = [threading.Thread(target=w.run_forever, args=(stop,), name=f"worker-{w.worker_id}", daemon=True)
               for w in workers]
    threads.append(threading.Thread(target=_expire_loop, name="expire", daemon=True,
                                    args=(store, stop, min(MAX_EXPIRE_INTERVAL, config.retention_seconds / 10))))
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=GRACEFUL_STOP_SECONDS))

    def announce() -> None:
        while not (server.started and all(w.ready.is_set() for w in workers)) and not stop.wait(0.05):
            pass
        if not stop.is_set():
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else config.port
            host = f"[{config.host}]" if ":" in config.host else config.host
            logger.info("wan serve: listening on http://%s:%d (models: %s; %d worker(s); store %s)", host, port,
                        ", ".join(catalog.names()), len(workers), _redacted(config.resolved_db_url()))

    for thread in threads:
        thread.start()
    threading.Thread(target=announce, name="announce", daemon=True).start()
    # uvicorn handles SIGINT/SIGTERM (stops accepting, finishes open requests), then raises the signal again
    # for the handler it found: make that one an interrupt, so the workers below still hand their jobs back.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for worker in workers:
            worker.wake.set()
        for thread in threads:
            thread.join(timeout=30)
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("wan serve: stopped")


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def work(config: ServeConfig, worker_id: str | None = None) -> None:
    """Run one worker against ``config``'s store until SIGTERM/SIGINT (blocks); logs
    "wan worker <id>: waiting for jobs" when its models are ready to be claimed for."""
    store = JobStore(config.resolved_db_url(), config.retention_seconds)
    catalog = ModelCatalog(config.models)
    worker = _worker(config, store, catalog, config.device, worker_id)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("wan worker %s: %s received; stopping (a running job goes back to the queue)", worker.worker_id,
                    signal.Signals(signum).name)
        stop.set()
        worker.wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.preload()
        logger.info("wan worker %s: waiting for jobs (models: %s; device %s; store %s)", worker.worker_id,
                    ", ".join(catalog.names()), worker.device, _redacted(config.resolved_db_url()))
        worker.run_forever(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()


def _redacted(url: str) -> str:
    """A database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
