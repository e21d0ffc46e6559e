"""The worker's pipelines: one shared `Scheduler` per pipeline key, idle ones kept for reuse.

A key is (dataset, spec, device, batch-size cap): every stream with the same key shares
one pipeline, whose `Scheduler` interleaves their batches. Caps are batch sizes rounded
up to a power of two (at most the server's limit), so nearby batch sizes share a
pipeline. At most `max_idle` pipelines without streams are kept (least recently used
closed first). All streams and pipelines of the worker share one lock and one
`MemoryBudget`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.engine.augmenter import Augmenter
from augsvc.server.batchcache import BatchCache
from augsvc.server.catalog import DatasetEntry
from augsvc.server.memory import MemoryBudget
from augsvc.server.metrics import ServerMetrics
from augsvc.server.producer import Job, StreamWork
from augsvc.server.scheduler import Scheduler

__all__ = ["PipelinePool", "PoolKey"]

log = logging.getLogger("augsvc.server")

PoolKey = tuple[str, AugmentSpec, str, int]


class PipelinePool:
    """Shared pipelines keyed by (dataset, spec, device, max batch size) (module doc).

    `depth` is how many batches a stream may have made ahead of its handler;
    `max_memory` the budget of every stream's batches together, in bytes. `metrics`
    gets the pipelines kept and built, the bytes held and the batches' queue and
    pipeline times.
    """

    def __init__(self, *, device: str, device_id: int, dali_threads: int, io_threads: int,
                 max_idle: int, max_memory: int, depth: int, cache: BatchCache,
                 max_batch_size: int = 1 << 30, metrics: ServerMetrics | None = None) -> None:
        self.device, self.device_id = device, device_id
        self.dali_threads, self.io_threads = dali_threads, io_threads
        self.max_idle, self.max_batch_size, self.depth = max_idle, max_batch_size, depth
        self.cache = cache
        self.lock = threading.Lock()
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.metrics.prefetch_limit.set(max_memory)
        self.budget = MemoryBudget(max_memory, gauge=self.metrics.prefetched)
        self._schedulers: dict[PoolKey, Scheduler] = {}
        self._exiting: set[Scheduler] = set()  # closed, finishing their last batches
        self._closed = False
        self.built = 0  # pipelines built so far (for tests and logs)

    def key(self, entry: DatasetEntry, spec: AugmentSpec, batch_size: int) -> PoolKey:
        cap = min(1 << (batch_size - 1).bit_length(), max(batch_size, self.max_batch_size))
        return (entry.name, spec, self.device, cap)

    def attach(self, job: Job, todo: list[int], client: str = "") -> StreamWork:
        """A stream's queue, fed by the shared pipeline of its key (built if needed);
        `client` (the peer) is who the scheduler is fair to."""
        request = job.request
        key = self.key(job.entry, request.spec, request.batch_size)
        work = StreamWork(job, todo, client=client, depth=self.depth, lock=self.lock,
                          budget=self.budget)
        with self.lock:
            if self._closed:
                raise RuntimeError("the server is stopping")
            scheduler = self._schedulers.get(key)
            if scheduler is None:
                build = functools.partial(self._build, job.entry, request.spec, job.stats, key[3])
                scheduler = Scheduler(key, build, lock=self.lock, budget=self.budget,
                                      cache=self.cache, on_exit=self._exited,
                                      on_idle=self._evict_idle, wake_all=self._wake_all,
                                      metrics=self.metrics)
                self._schedulers[key] = scheduler
                self._count_pipelines()
                scheduler.start()
            scheduler.attach(work)
        return work

    def schedulers(self) -> list[Scheduler]:
        with self.lock:
            return list(self._schedulers.values())

    def _build(self, entry: DatasetEntry, spec: AugmentSpec, stats: DatasetStats,
               cap: int) -> Augmenter:
        started = time.monotonic()
        augmenter = Augmenter(
            entry.index, spec, stats, max_batch_size=cap, device=self.device,
            num_threads=self.dali_threads, io_threads=self.io_threads,
            device_id=self.device_id if self.device == "gpu" else None,
        )
        with self.lock:
            self.built += 1
        self.metrics.pipelines_built.inc()
        log.debug("built a %s pipeline for %s (max batch %d) in %.2f s", self.device,
                  entry.name, cap, time.monotonic() - started)
        return augmenter

    # --- scheduler callbacks

    def _wake_all(self) -> None:  # lock held
        for scheduler in self._schedulers.values():
            scheduler.wake()

    def _evict_idle(self) -> None:  # lock held
        idle = sorted((s for s in self._schedulers.values() if not s.streams),
                      key=lambda s: s.idle_since)
        for scheduler in idle[: max(0, len(idle) - self.max_idle)]:
            self._retire(scheduler)

    def _retire(self, scheduler: Scheduler) -> None:  # lock held
        del self._schedulers[scheduler.key]
        self._exiting.add(scheduler)
        scheduler.close()

    def _count_pipelines(self) -> None:  # lock held
        self.metrics.pipelines.set(len(self._schedulers) + len(self._exiting))

    def _exited(self, scheduler: Scheduler, error: BaseException | None) -> None:
        with self.lock:
            self._exiting.discard(scheduler)
            if self._schedulers.get(scheduler.key) is scheduler:
                del self._schedulers[scheduler.key]
            self._count_pipelines()
            for work in scheduler.streams:
                work._fail(error or RuntimeError("the pipeline stopped"))

    # --- shutdown

    def close(self) -> None:
        """Stop every pipeline; streams still attached fail."""
        with self.lock:
            self._closed = True
            for scheduler in list(self._schedulers.values()):
                for work in scheduler.streams:
                    work._fail(RuntimeError("the server is stopping"))
                self._retire(scheduler)

    def join(self, timeout: float) -> None:
        """Wait for the pipelines' threads after `close`."""
        deadline = time.monotonic() + timeout
        with self.lock:
            exiting = list(self._exiting)
        for scheduler in exiting:
            scheduler.join(max(0.0, deadline - time.monotonic()))
