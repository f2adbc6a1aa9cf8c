"""A worker: claim a job from the store, run it, store the video; repeat.

Each worker keeps its pipelines loaded (:class:`PipelineCache`: one per model, loaded on first use).
While a job runs, its lease is renewed every ``lease_seconds / 3`` by a heartbeat thread, and with
each progress write (at most once a second); a renewal that fails (the job was cancelled, or another
worker took it after the lease expired) makes the pipeline stop at its next step. A worker that dies
simply stops renewing: the store re-queues its job when the lease expires.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runner import JobStopped, run_job
from .service import ModelCatalog, ServedModel, lora_files
from .store import Job, JobStore

if TYPE_CHECKING:
    from wan_runtime import WanVideoPipeline

    from .metrics import Metrics

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0  # seconds between progress writes
SHORT_MEMORY = 0.5  # on CUDA, drop the other pipelines before a load when less than this share is free


def default_worker_id() -> str:
    """``host-pid-N``: unique per worker, readable in logs and in the jobs table."""
    default_worker_id.count += 1
    return f"{socket.gethostname()}-{os.getpid()}-{default_worker_id.count}"


default_worker_id.count = 0


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """A dtype name as a torch dtype the pipeline computes in (:func:`wan_runtime.devices.resolve_dtype`);
    None: bfloat16 on CUDA, float32 elsewhere (CPUs are slow in bf16)."""
    from wan_runtime.devices import resolve_dtype as pipeline_dtype

    return pipeline_dtype(dtype or ("bfloat16" if device.startswith("cuda") else "float32"), "dtype")


class PipelineCache:
    """Loaded pipelines by model name, loaded once and kept. On CUDA, when less than half the GPU memory
    is free, every loaded pipeline is dropped before another one loads (so with short VRAM only one model
    is resident at a time and switching models costs a reload)."""

    def __init__(self, device: str, dtype: Any, models_dir: str = "models") -> None:
        self.device, self.dtype, self.models_dir = device, dtype, models_dir
        self.pipes: dict[str, WanVideoPipeline] = {}

    def get(self, model: ServedModel) -> "WanVideoPipeline":
        if model.name in self.pipes:
            return self.pipes[model.name]
        self._make_room()
        from wan_runtime import WanVideoPipeline
        from wan_runtime.sources import resolve_model

        source = resolve_model(model.source)
        started = time.perf_counter()
        pipe = WanVideoPipeline.from_pretrained(torch_dtype=self.dtype, device=self.device,
                                                model_configs=source.model_configs,
                                                tokenizer_config=source.tokenizer_config,
                                                local_model_path=self.models_dir, progress_bar_cmd=lambda x: x)
        logger.info("loaded %s on %s in %.1f s", model.name, self.device, time.perf_counter() - started)
        self.pipes[model.name] = pipe
        return pipe

    def _make_room(self) -> None:
        import torch

        if not self.pipes or not self.device.startswith("cuda"):
            return
        index = torch.device(self.device).index or 0
        free, total = torch.cuda.mem_get_info(index)
        if free >= SHORT_MEMORY * total:
            return
        for name in self.pipes:
            logger.info("dropped %s from %s to make room for another model", name, self.device)
        self.pipes.clear()
        gc.collect()
        torch.cuda.empty_cache()


class Worker:
    """Claims and runs jobs of ``catalog``'s models from ``store`` on ``device``.

    ``wake`` (set by an in-process API on each submission) ends the idle wait at once; otherwise the
    store is polled every ``poll_seconds`` for jobs other processes submitted.
    """

    def __init__(self, store: JobStore, catalog: ModelCatalog, worker_id: str | None = None,
                 device: str | None = None, dtype: str | None = None, lease_seconds: float = 60.0,
                 lora_dir: str | Path | None = None, models_dir: str = "models", poll_seconds: float = 0.5,
                 wake: threading.Event | None = None, metrics: "Metrics | None" = None) -> None:
        from wan_runtime.devices import resolve_device

        self.store, self.catalog = store, catalog
        self.worker_id = worker_id or default_worker_id()
        self.device = str(resolve_device(device or ("cuda" if _cuda() else "cpu"), "device"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.lease_seconds = lease_seconds
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.poll_seconds = poll_seconds
        self.wake = wake if wake is not None else threading.Event()
        self.metrics = metrics
        self.pipelines = PipelineCache(self.device, self.dtype, models_dir)
        self.shutdown = threading.Event()  # set by run_forever's stop: the running job stops at its next step
        self.ready = threading.Event()  # set once preload() has loaded the models

    def preload(self) -> None:
        """Load every served model now, so the first job starts at once; a model that fails to load is
        logged (its jobs then fail with the reason)."""
        for model in self.catalog.models.values():
            try:
                self.pipelines.get(model)
            except Exception:
                logger.exception("worker %s: loading %s failed", self.worker_id, model.name)
        self.ready.set()

    def run_once(self) -> bool:
        """Claim and run one job; False when none was waiting."""
        job = self.store.claim(self.worker_id, self.catalog.names(), self.lease_seconds)
        if job is None:
            return False
        self._run(job)
        return True

    def run_forever(self, stop: threading.Event) -> None:
        """Run jobs until ``stop`` is set (models preloaded first); a job held when stopping goes back to
        the queue."""
        self.shutdown = stop
        if not self.ready.is_set():
            self.preload()
        logger.info("worker %s on %s: waiting for jobs", self.worker_id, self.device)
        while not stop.is_set():
            try:
                if self.run_once():
                    continue
            except Exception:  # a store outage: log it, wait, retry (the jobs stay safe in the store)
                logger.exception("worker %s: claiming a job failed; retrying", self.worker_id)
            if self.wake.wait(self.poll_seconds):
                self.wake.clear()
        self.store.release(self.worker_id)

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        stop = threading.Event()
        state = {"progress": 0, "written": 0.0}

        def beat(progress: int | None = None) -> None:
            try:
                if not self.store.heartbeat(job.id, self.worker_id, progress, self.lease_seconds):
                    stop.set()
            except Exception:  # the store is briefly unreachable: the next beat may succeed
                logger.exception("job %s: lease renewal failed", job.id)

        def heartbeats() -> None:
            while not stop.wait(self.lease_seconds / 3):
                beat(state["progress"])

        def progress(done: int, total: int) -> None:
            state["progress"] = int(100 * done / total) if done < total else 99
            now = time.monotonic()
            if now - state["written"] >= PROGRESS_INTERVAL:
                state["written"] = now
                beat(state["progress"])

        beater = threading.Thread(target=heartbeats, name=f"lease-{job.id}", daemon=True)
        beater.start()
        status = "failed"
        try:
            model = self.catalog.spec(job.model)
            pipe = self.pipelines.get(model)
            image = self._input_image(job)
            step_seconds = (self.metrics.step_seconds.labels(job.model).observe if self.metrics is not None
                            else None)
            video = run_job(pipe, job.params, image, self._lora_paths(job), progress,
                            lambda: stop.is_set() or self.shutdown.is_set(), step_seconds)
            stop.set()
            if self.store.complete(job.id, self.worker_id, video):
                status = "completed"
            logger.info("job %s: %s in %.1f s", job.id, status if status == "completed" else "dropped",
                        time.perf_counter() - started)
        except JobStopped:
            if self.shutdown.is_set() and not stop.is_set():
                status = "released"
                self.store.release(self.worker_id)
                logger.info("job %s goes back to the queue: worker %s is stopping", job.id, self.worker_id)
            else:  # cancelled (the store records it so), or the lease went to another worker (nothing to do)
                status = "cancelled"
                self.store.fail(job.id, self.worker_id, "cancelled", "the job was cancelled")
                logger.info("job %s stopped (cancelled or lease lost)", job.id)
        except Exception as e:
            logger.exception("job %s failed", job.id)
            self.store.fail(job.id, self.worker_id, "generation_failed", f"{type(e).__name__}: {e}")
        finally:
            stop.set()
            beater.join()
        if self.metrics is not None:
            self.metrics.finished.labels(job.model, status).inc()
            self.metrics.job_seconds.labels(job.model).observe(time.perf_counter() - started)

    def _input_image(self, job: Job) -> Any:
        data = self.store.get_blob(job.id, "input_reference")
        if data is None:
            return None
        from PIL import Image
        from wan_runtime.images import to_rgb

        with Image.open(BytesIO(data)) as image:  # to_rgb: 16-bit greyscale scaled as `wan generate` reads it
            return to_rgb(image)

    def _lora_paths(self, job: Job) -> list[tuple[Path, float]]:
        loras = job.params.get("loras") or []
        if loras and self.lora_dir is None:
            raise ValueError("the job names LoRAs but this worker has no LoRA folder (--lora-dir)")
        # Names were matched against the folder's listing at submission; look them up again the same way.
        available = lora_files(self.lora_dir) if loras else {}
        paths = []
        for name, strength in loras:
            if name not in available:
                raise FileNotFoundError(f"LoRA {name!r} is not in {self.lora_dir} on this worker")
            paths.append((available[name], float(strength)))
        return paths


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
