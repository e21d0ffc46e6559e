"""The `augsvc.v1.Augment` servicer: ListDatasets, GetDataset and StreamBatches over a catalog.

A StreamBatches call is validated completely before any work starts; every failure is
a gRPC status whose message says what to fix. Then a producer thread
(`augsvc.server.producer`) runs the batches through a pooled `Augmenter` into a queue
of `prefetch` finished batches while the handler thread sends the current one; the
queue bound and gRPC flow control (the handler blocks while the client is slow) bound
the memory a stream holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from augsvc import wire
from augsvc.core.sampling import EpochOrder, EpochPlan, Sharding, epoch_length
from augsvc.core.spec import SpecError
from augsvc.core.stats import DatasetStats
from augsvc.server.batchcache import BatchCache
from augsvc.server.catalog import Catalog, DatasetEntry
from augsvc.server.pipelines import PipelinePool
from augsvc.server.plans import OrderCache, plan_budget
from augsvc.server.producer import Job, Producer
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire._proto import augment_pb2_grpc as pb_grpc
from augsvc.wire.convert import (
    RequestError,
    StreamRequest,
    dataset_info,
    dataset_summary,
    select_stats_source,
)

__all__ = ["AugmentServicer"]

log = logging.getLogger("augsvc.server")

_MIB = 1 << 20
MAX_DETAILS = 2000  # characters of an exception message sent back in an INTERNAL status
_POLL = 0.2  # seconds between checks for a cancelled stream while waiting


class _Abort(Exception):
    """End the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class AugmentServicer(pb_grpc.AugmentServicer):
    """ListDatasets, GetDataset and StreamBatches over a catalog (register with
    `augsvc.wire.add_augment_servicer`: StreamBatches yields pre-encoded frames)."""

    def __init__(self, catalog: Catalog, pool: PipelinePool, *, max_streams: int,
                 max_batch_size: int, prefetch: int, cache_bytes: int = 0) -> None:
        self.catalog, self.pool = catalog, pool
        self.cache = BatchCache(cache_bytes)
        self.orders = OrderCache(plan_budget(len(e.index) for e in catalog.values()))
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
                source = select_stats_source(request.stats, entry.stats)  # "" / "auto" too
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
    def _stats(entry: DatasetEntry, choice: str) -> tuple[str, DatasetStats]:
        """(source, statistics) of a spec's choice (AugmentSpec.stats, already validated)."""
        try:
            return entry.resolve_stats(choice)
        except LookupError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"AugmentSpec.stats: no {choice!r} statistics for dataset "
                         f"{entry.name!r} on this server: {exc.args[0]}, then restart the "
                         f"server; or use stats 'auto' or 'imagenet'") from None

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
        producer = Producer(self.pool, job, self.prefetch, self._producers, self.cache,
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

    def _validate(self, request: pb.StreamBatchesRequest) -> Job:
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
        source, stats = self._stats(entry, req.spec.stats)
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
        return Job(req, entry, stats, source, plan, batches,
                   wire.resolve_chunk_bytes(req.chunk_bytes))

    def _plan(self, entry: DatasetEntry, req: StreamRequest) -> EpochPlan:
        """The request's rank's plan over the epoch order of (dataset, seed, epoch, balance,
        shuffle), which every rank, batch size and call of that epoch shares.

        The sharding is checked before anything is built; the order costs O(dataset)
        memory (shuffling 1.28M samples takes ~0.2 s, once per epoch); a batch of the
        plan is computed when the producer asks for it.
        """
        index = entry.index
        counts = np.bincount(index.labels) if req.balance else None
        sharding = Sharding(epoch_length(len(index), counts), req.batch_size, req.world_size,
                            req.tail)
        nbytes = EpochOrder.nbytes_for(len(index), sharding.length, req.balance)
        if nbytes > self.orders.max_bytes:  # only class balancing makes an order this large
            raise ValueError(f"balance=true up-samples the dataset to {sharding.length} "
                             f"entries, whose epoch order would take {nbytes / _MIB:,.0f} MiB, "
                             f"over this server's limit of {self.orders.max_bytes / _MIB:,.0f} "
                             f"MiB for epoch orders")
        order = self.orders.get(
            (entry.name, req.seed, req.epoch, req.balance, req.shuffle),
            lambda: EpochOrder.build(len(index), req.seed, req.epoch, index.labels, req.balance,
                                     req.shuffle))
        return EpochPlan.from_order(order, sharding, req.rank)

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
