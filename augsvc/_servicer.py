"""The `augsvc.v1.Augment` servicer, its pipeline pool and the bearer-token check.

A StreamBatches call is validated completely before any work starts; every failure is
a gRPC status whose message says what to fix. Then a producer thread runs the
batches through a pooled `Augmenter` into a queue of `prefetch` finished batches while
the handler thread sends the current one; the queue bound and gRPC flow control (the
handler blocks while the client is slow) bound the memory a stream holds.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from augsvc import wire
from augsvc._batchcache import BatchCache
from augsvc._proto import augment_pb2 as pb
from augsvc._proto import augment_pb2_grpc as pb_grpc
from augsvc.dataset import DatasetIndex
from augsvc.engine import AugmentedBatch, Augmenter
from augsvc.protocol import (
    RequestError,
    StreamRequest,
    dataset_info,
    dataset_summary,
    select_stats_source,
)
from augsvc.sampling import EpochPlan
from augsvc.spec import AugmentSpec, SpecError
from augsvc.stats import DatasetStats

__all__ = ["AugmentServicer", "Catalog", "DatasetEntry", "PipelinePool", "TokenInterceptor"]

log = logging.getLogger("augsvc.server")

MAX_DETAILS = 2000  # characters of an exception message sent back in an INTERNAL status
PLAN_CACHE = 8  # epoch plans kept per worker (ImageNet-sized: ~20 MB each)
_POLL = 0.2  # seconds between checks for a cancelled stream while waiting


@dataclass(frozen=True)
class DatasetEntry:
    """A served dataset: its index and the statistics sources available for it."""

    name: str
    index: DatasetIndex
    stats: Mapping[str, DatasetStats]  # source ("dataset", "imagenet") -> stats
    missing_stats: Mapping[str, str]  # source -> why it is not available


Catalog = Mapping[str, DatasetEntry]


class _Abort(Exception):
    """End the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


# ---------------------------------------------------------------------------
# pipelines


PoolKey = tuple[str, AugmentSpec, str, int]


class PipelinePool:
    """Idle `Augmenter`s keyed by (dataset, spec, device, max batch size), reused by streams.

    `acquire` hands a pipeline to one stream exclusively (building one when none is
    idle); `release` returns it. At most `max_idle` idle pipelines are kept (least
    recently used dropped first). Max batch sizes are rounded up to a power of two
    (capped at the server's limit) so nearby batch sizes share pipelines.
    """

    def __init__(self, *, device: str, device_id: int, dali_threads: int, io_threads: int,
                 max_idle: int, max_batch_size: int = 1 << 30) -> None:
        self.device, self.device_id = device, device_id
        self.dali_threads, self.io_threads = dali_threads, io_threads
        self.max_idle, self.max_batch_size = max_idle, max_batch_size
        self._idle: list[tuple[PoolKey, Augmenter]] = []  # oldest first
        self._lock = threading.Lock()
        self._closed = False
        self.built = 0  # pipelines built so far (for tests and logs)

    def acquire(self, entry: DatasetEntry, spec: AugmentSpec, stats: DatasetStats,
                batch_size: int) -> tuple[PoolKey, Augmenter]:
        """An idle pipeline for these arguments, or a new one (~0.3 s to build)."""
        cap = min(1 << (batch_size - 1).bit_length(), max(batch_size, self.max_batch_size))
        key: PoolKey = (entry.name, spec, self.device, cap)
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i][0] == key:
                    return self._idle.pop(i)
        started = time.monotonic()
        augmenter = Augmenter(
            entry.index, spec, stats, max_batch_size=cap, device=self.device,
            num_threads=self.dali_threads, io_threads=self.io_threads,
            device_id=self.device_id if self.device == "gpu" else None,
        )
        with self._lock:
            self.built += 1
        log.debug("built a %s pipeline for %s (max batch %d) in %.2f s", self.device,
                  entry.name, cap, time.monotonic() - started)
        return key, augmenter

    def release(self, key: PoolKey, augmenter: Augmenter) -> None:
        """Give a pipeline back for reuse."""
        with self._lock:
            if self._closed:
                evicted = [augmenter]
            else:
                self._idle.append((key, augmenter))
                evicted = [a for _, a in self._idle[: max(0, len(self._idle) - self.max_idle)]]
                del self._idle[: len(evicted)]
        for a in evicted:
            a.close()

    def close(self) -> None:
        """Drop every idle pipeline; later releases close theirs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, a in idle:
            a.close()


# ---------------------------------------------------------------------------
# streams


@dataclass(frozen=True)
class _Job:
    """A validated StreamBatches call."""

    request: StreamRequest
    entry: DatasetEntry
    stats: DatasetStats
    plan: EpochPlan
    batches: tuple[int, ...]
    chunk_bytes: int

    def cache_key(self, k: int) -> tuple:
        """Everything that determines batch k's frames."""
        r = self.request
        return (self.entry.name, r.spec, r.seed, r.epoch, r.rank, r.world_size, r.batch_size,
                r.tail, r.balance, self.chunk_bytes, k)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Producer:
    """Runs a job's batches on a pooled pipeline into a bounded queue (one thread)."""

    def __init__(self, pool: PipelinePool, job: _Job, depth: int,
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


def _encode(job: _Job, k: int, result: AugmentedBatch) -> tuple[bytes, ...]:
    """Batch k's wire frames (one copy of the pixels, made on the producer thread)."""
    return tuple(wire.encode_batch(
        result.images, batch_index=k, layout=job.request.spec.layout, labels=result.labels,
        sample_ids=result.sample_ids, draw_ids=result.draw_ids, dropped=result.dropped,
        chunk_bytes=job.chunk_bytes,
    ))


class AugmentServicer(pb_grpc.AugmentServicer):
    """ListDatasets, GetDataset and StreamBatches over a catalog (register with
    `augsvc.wire.add_augment_servicer`: StreamBatches yields pre-encoded frames)."""

    def __init__(self, catalog: Catalog, pool: PipelinePool, *, max_streams: int,
                 max_batch_size: int, prefetch: int, cache_bytes: int = 0) -> None:
        self.catalog, self.pool = catalog, pool
        self.cache = BatchCache(cache_bytes)
        self._plans: OrderedDict[tuple, EpochPlan] = OrderedDict()
        self._plans_lock = threading.Lock()
        self.max_streams, self.max_batch_size, self.prefetch = (
            max_streams, max_batch_size, prefetch)
        pool.max_batch_size = max_batch_size
        self._cond = threading.Condition()
        self._active = 0
        self._refusing = False
        self._force = threading.Event()
        self._producers: set[threading.Thread] = set()

    # --- unary calls

    def ListDatasets(self, request: pb.ListDatasetsRequest,
                     context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        return pb.ListDatasetsResponse(datasets=[
            dataset_summary(e.name, len(e.index), len(e.index.classes))
            for e in self.catalog.values()
        ])

    def GetDataset(self, request: pb.GetDatasetRequest,
                   context: grpc.ServicerContext) -> pb.DatasetInfo:
        try:
            entry = self._entry(request.name, "GetDatasetRequest.name")
            try:
                source = select_stats_source(request.stats, entry.stats)
            except LookupError as exc:
                hint = entry.missing_stats.get(request.stats, "")
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"GetDatasetRequest.stats: {exc}"
                             f"{'; ' + hint if hint else ''}") from None
            except ValueError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except _Abort as abort:
            context.abort(abort.code, abort.details)
        index = entry.index
        return dataset_info(entry.name, len(index), index.classes, entry.stats[source], source,
                            num_rejected=len(index.rejected), stats_sources=entry.stats,
                            class_counts=np.bincount(index.labels, minlength=len(index.classes)))

    def _entry(self, name: str, field: str) -> DatasetEntry:
        entry = self.catalog.get(name)
        if entry is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"{field}: unknown dataset {name!r}; this server has: "
                         f"{', '.join(self.catalog) or '(none)'}")
        return entry

    @staticmethod
    def _stats(entry: DatasetEntry, source: str) -> DatasetStats:
        """The statistics a spec names (AugmentSpec.stats, already validated)."""
        stats = entry.stats.get(source)
        if stats is None:
            why = entry.missing_stats.get(source, "not available")
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"AugmentSpec.stats: no {source!r} statistics for dataset "
                         f"{entry.name!r} on this server: {why}, then restart the server; "
                         f"or use stats 'imagenet'")
        return stats

    # --- streams

    def StreamBatches(self, request: pb.StreamBatchesRequest,
                      context: grpc.ServicerContext) -> Iterator[bytes]:
        started = time.monotonic()
        try:
            job = self._validate(request)
            release = self._take_slot()
        except _Abort as abort:
            log.info("refused stream from %s: %s: %s", context.peer(), abort.code.name,
                     abort.details)
            context.abort(abort.code, abort.details)
        # The slot is freed when the call ends, not when this generator returns: the
        # last batches may still be buffered for a slow client, and a draining server
        # must wait for them to be delivered.
        if not context.add_callback(release):
            release()
        req, peer = job.request, context.peer()
        progress = {"sent": 0, "failed": False}

        def finished() -> None:
            sent, total = progress["sent"], len(job.batches)
            outcome = ("failed" if progress["failed"] else "cancelled" if sent < total
                       else "done")
            log.info("stream from %s %s: %s, %d of %d batch(es) of %d in %.2f s", peer,
                     outcome, req.dataset, sent, total, req.batch_size,
                     time.monotonic() - started)

        context.add_callback(finished)
        cached = [self.cache.get(job.cache_key(k)) for k in job.batches]
        if all(frames is not None for frames in cached):  # no pipeline, no producer thread
            for frames in cached:
                yield from frames
                progress["sent"] += 1
            return
        producer = _Producer(self.pool, job, self.prefetch, self._producers, self.cache,
                             cached)
        context.add_callback(producer.cancel)
        try:
            producer.start()
            for _ in job.batches:
                item = producer.get()
                if item is None:  # the call was cancelled or the server stopped
                    return
                yield from item[1]
                progress["sent"] += 1
        except Exception as exc:
            progress["failed"] = True
            log.exception("stream from %s failed at batch %d of %d (dataset %s)", peer,
                          progress["sent"], len(job.batches), req.dataset)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:MAX_DETAILS])
        finally:
            producer.cancel()

    def _validate(self, request: pb.StreamBatchesRequest) -> _Job:
        """The call's job, or _Abort with the status that tells the client what to fix."""
        if self._refusing:
            raise _Abort(grpc.StatusCode.UNAVAILABLE,
                         "the server is shutting down; retry on another server")
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        try:
            req = StreamRequest.from_proto(request)
        except (SpecError, RequestError) as exc:
            raise _Abort(invalid, str(exc)) from None
        entry = self._entry(req.dataset, "StreamBatchesRequest.dataset")
        if req.batch_size > self.max_batch_size:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"StreamBatchesRequest.batch_size: {req.batch_size} is over this "
                         f"server's limit of {self.max_batch_size}; use smaller batches "
                         f"(or start the server with a larger --max-batch-size)")
        stats = self._stats(entry, req.spec.stats)
        index = entry.index
        try:
            plan = self._plan(entry, req)
        except ValueError as exc:
            raise _Abort(invalid, f"StreamBatchesRequest: {exc} (dataset {entry.name!r} "
                         f"has {len(index)} samples)") from None
        batches = req.batches or tuple(range(len(plan)))
        bad = [b for b in batches if b >= len(plan)]
        if bad:
            raise _Abort(invalid, f"StreamBatchesRequest.batches: batch {bad[0]} is out of "
                         f"range; rank {req.rank} of {req.world_size} has {len(plan)} "
                         f"batch(es) of {req.batch_size} in dataset {entry.name!r} "
                         f"(valid: 0..{len(plan) - 1})")
        return _Job(req, entry, stats, plan, batches, wire.resolve_chunk_bytes(req.chunk_bytes))

    def _plan(self, entry: DatasetEntry, req: StreamRequest) -> EpochPlan:
        """The epoch order of a request, shared by all ranks and calls of the same epoch.

        Shuffling a 1.28M-sample epoch takes ~0.2 s: done once per epoch, not per call.
        """
        key = (entry.name, req.batch_size, req.seed, req.epoch, req.world_size, req.tail,
               req.balance)
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        index = entry.index
        plan = EpochPlan(len(index), req.batch_size, req.seed, req.epoch, 0, req.world_size,
                         req.tail, index.labels, req.balance)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        return plan

    def _take_slot(self) -> Callable[[], None]:
        """Count the stream against --max-streams; a once-only release function."""
        with self._cond:
            if self._refusing:
                raise _Abort(grpc.StatusCode.UNAVAILABLE,
                             "the server is shutting down; retry on another server")
            if self._active >= self.max_streams:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"too many concurrent streams: this server process runs at most "
                             f"{self.max_streams}; retry later, use another server, or raise "
                             f"its --max-streams")
            self._active += 1
        released = threading.Lock()

        def release() -> None:
            if released.acquire(blocking=False):
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

        return release

    # --- shutdown

    @property
    def active_streams(self) -> int:
        return self._active

    def refuse_new_streams(self) -> None:
        """New StreamBatches calls fail with UNAVAILABLE from now on."""
        with self._cond:
            self._refusing = True

    def force_drain(self) -> None:
        """Make a running `drain` return now."""
        self._force.set()

    def drain(self, timeout: float) -> int:
        """Wait up to `timeout` s for running streams to end; how many are still running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._active and not self._force.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, _POLL))
            return self._active

    def join_streams(self, timeout: float) -> None:
        """Wait for the producer threads of ended streams to let go of their pipelines."""
        deadline = time.monotonic() + timeout
        for thread in list(self._producers):
            thread.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------
# authentication


class TokenInterceptor(grpc.ServerInterceptor):
    """`augsvc.v1.Augment` calls need metadata `authorization: Bearer <token>`
    (UNAUTHENTICATED otherwise); other services (health, reflection) stay open."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._prefix = f"/{wire.SERVICE_NAME}/"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not details.method.startswith(self._prefix):
            return continuation(details)
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if not values:
            return _deny(details.method, "missing credentials: send metadata "
                         "'authorization: Bearer <token>' with the server's token")
        scheme, _, given = str(values[0]).partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return continuation(details)
        return _deny(details.method, "invalid credentials: the bearer token in "
                     "'authorization' metadata does not match the server's token")


def _deny(method: str, message: str) -> grpc.RpcMethodHandler:
    def abort(request: bytes, context: grpc.ServicerContext) -> None:
        log.info("unauthenticated call to %s from %s", method, context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if method == wire.STREAM_BATCHES_METHOD:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
