"""A stream's producer: runs a validated job's batches on a pooled pipeline into a bounded queue."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from augsvc import wire
from augsvc.core.sampling import EpochPlan
from augsvc.core.stats import DatasetStats
from augsvc.engine.augmenter import AugmentedBatch
from augsvc.server.batchcache import BatchCache
from augsvc.server.catalog import DatasetEntry
from augsvc.server.pipelines import PipelinePool
from augsvc.wire.convert import StreamRequest

__all__ = ["Job", "Producer"]

_POLL = 0.2  # seconds between checks for a cancelled stream while waiting


@dataclass(frozen=True)
class Job:
    """A validated StreamBatches call."""

    request: StreamRequest
    entry: DatasetEntry
    stats: DatasetStats
    stats_source: str  # which statistics `stats` are: "dataset" or "imagenet"
    plan: EpochPlan
    batches: tuple[int, ...]
    chunk_bytes: int

    def cache_key(self, k: int) -> tuple:
        """Everything that determines batch k's frames."""
        return (self.request.batch_key(), self.chunk_bytes, k)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Producer:
    """Runs a job's batches on a pooled pipeline into a bounded queue (one thread)."""

    def __init__(self, pool: PipelinePool, job: Job, depth: int,
                 threads: set[threading.Thread], cache: BatchCache,
                 cached: list[tuple[bytes, ...] | None]) -> None:
        self._pool, self._job, self._threads, self._cache = pool, job, threads, cache
        self._cached = cached  # the job's batches already in the cache (None: to make)
        self._queue: queue.Queue[tuple[int, tuple[bytes, ...]] | _Failure] = queue.Queue(depth)
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="augsvc-producer", daemon=True)

    def start(self) -> None:
        self._threads.add(self._thread)
        self._thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    def get(self) -> tuple[int, tuple[bytes, ...]] | None:
        """The next batch's wire frames; None once cancelled; re-raises the producer's error."""
        while not self.cancelled.is_set():
            try:
                item = self._queue.get(timeout=_POLL)
            except queue.Empty:
                continue
            if isinstance(item, _Failure):
                raise item.exc
            return item
        return None

    def _put(self, item: tuple[int, tuple[bytes, ...]] | _Failure) -> bool:
        while not self.cancelled.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        job, request, cached = self._job, self._job.request, self._cached
        try:
            try:
                key, augmenter = self._pool.acquire(job.entry, request.spec, job.stats,
                                                    request.batch_size)
            except Exception as exc:
                self._put(_Failure(exc))
                return
            reusable = True
            try:
                for k, frames in zip(job.batches, cached, strict=True):
                    if self.cancelled.is_set():
                        return
                    if frames is None:
                        result = augmenter.run_batch(request.seed, request.epoch,
                                                     job.plan.batch(k, request.rank))
                        frames = _encode(job, k, result)
                        self._cache.put(job.cache_key(k), frames)
                    if not self._put((k, frames)):
                        return
            except Exception as exc:
                reusable = False  # a pipeline that failed unexpectedly is not trusted again
                self._put(_Failure(exc))
            finally:
                if reusable:
                    self._pool.release(key, augmenter)
                else:
                    augmenter.close()
        finally:
            self._threads.discard(self._thread)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def _encode(job: Job, k: int, result: AugmentedBatch) -> tuple[bytes, ...]:
    """Batch k's wire frames (one copy of the pixels, made on the producer thread)."""
    return tuple(wire.encode_batch(
        result.images, batch_index=k, layout=job.request.spec.layout, labels=result.labels,
        sample_ids=result.sample_ids, draw_ids=result.draw_ids, dropped=result.dropped,
        substituted=result.substituted, stats_source=job.stats_source,
        chunk_bytes=job.chunk_bytes,
    ))
