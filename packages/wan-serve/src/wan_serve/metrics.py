"""Prometheus metrics of one app: its own ``CollectorRegistry`` (no process globals, so several apps or
tests never collide). Queue depth and jobs by state are read from the store at scrape time, so they
count every worker's jobs, also those of other processes; step times are those of this process's workers.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _StoreCollector(Collector):
    """``wan_serve_queue_depth`` and ``wan_serve_jobs{state}`` from the store, plus GPU memory under CUDA."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        counts = self.store.counts()
        yield GaugeMetricFamily("wan_serve_queue_depth", "Jobs waiting for a worker.", value=counts["queued"])
        jobs = GaugeMetricFamily("wan_serve_jobs", "Jobs in the store by state.", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[Any]:
    import torch

    if not torch.cuda.is_available():
        return
    allocated = GaugeMetricFamily("wan_serve_gpu_memory_allocated_bytes", "GPU memory held by tensors.",
                                  labels=["device"])
    reserved = GaugeMetricFamily("wan_serve_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator.",
                                 labels=["device"])
    for index in range(torch.cuda.device_count()):
        allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
        reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
    yield allocated
    yield reserved


class Metrics:
    """The collectors of one app; workers in the same process report step times and outcomes here."""

    def __init__(self, store: JobStore) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.step_seconds = Histogram("wan_serve_step_seconds", "Seconds per denoising step.", ["model"],
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("wan_serve_job_seconds", "Seconds from claim to result, per job.", ["model"],
                                     buckets=STEP_BUCKETS, registry=self.registry)
        self.submitted = Counter("wan_serve_jobs_submitted", "Jobs accepted by the API.", ["model"],
                                 registry=self.registry)
        self.finished = Counter("wan_serve_jobs_finished", "Jobs finished by this process's workers.",
                                ["model", "status"], registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)
