"""The `augsvc.v1.Augment` servicer: ListDatasets, GetDataset and StreamBatches over a catalog.

A StreamBatches call takes a slot (`augsvc.server.admission`; the interceptor refused
it already if there was none) and is validated completely before any work starts; every
failure is a gRPC status whose message says what to fix. A worker of `augsvc serve` names
itself in the initial metadata of every call it accepts (`wire.WORKER_KEY`), so that a
loader can even its connections out over the workers. Its batches not in the batch
cache go to the shared pipeline of its spec (`augsvc.server.pipelines`), whose scheduler
makes them, a few ahead, into the stream's queue (`augsvc.server.producer.StreamWork`)
while the handler thread sends them. The per-stream depth (`--prefetch`), the worker's
memory budget (`--max-memory`), gRPC flow control and the stall timeout
(`augsvc.server.watchdog`) bound the memory a stream holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from augsvc import wire
from augsvc.core.sampling import EpochOrder, EpochPlan, Sharding, epoch_length
from augsvc.core.spec import SpecError
from augsvc.core.stats import DatasetStats
from augsvc.core.text import clip
from augsvc.server.admission import Admission, Refused
from augsvc.server.batchcache import BatchCache
from augsvc.server.catalog import Catalog, DatasetEntry
from augsvc.server.logs import request_log
from augsvc.server.metrics import ServerMetrics
from augsvc.server.pipelines import PipelinePool
from augsvc.server.plans import OrderCache, plan_budget
from augsvc.server.producer import Job
from augsvc.server.watchdog import Watchdog
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

_MIB = 1 << 20
MAX_DETAILS = 2000  # characters of an exception message sent back in an INTERNAL status


class _Abort(Exception):
    """End the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class AugmentServicer(pb_grpc.AugmentServicer):
    """ListDatasets, GetDataset and StreamBatches over a catalog (register with
    `augsvc.wire.add_augment_servicer`: StreamBatches yields pre-encoded frames)."""

    def __init__(self, catalog: Catalog, pool: PipelinePool, admission: Admission, *,
                 max_batch_size: int, cache: BatchCache, stall_timeout: float,
                 metrics: ServerMetrics, worker: tuple[int, int] | None = None) -> None:
        self.catalog, self.pool, self.admission, self.cache = catalog, pool, admission, cache
        self.metrics = metrics
        self.orders = OrderCache(plan_budget(len(e.index) for e in catalog.values()))
        self.max_batch_size = max_batch_size
        self.watchdog = Watchdog(stall_timeout, idle=lambda: admission.active == 0,
                                 refused=lambda: admission.refused)
        self.watchdog.start()
        self._force = threading.Event()
        self._worker = () if worker is None else wire.worker_metadata(*worker)

    @property
    def _refusing(self) -> bool:
        return self.admission.refusing

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
            context.abort(abort.code, abort.details[:MAX_DETAILS])
        index = entry.index
        return dataset_info(entry.name, len(index), index.classes, entry.stats[source], source,
                            num_rejected=len(index.rejected), stats_sources=entry.stats,
                            class_counts=np.bincount(index.labels, minlength=len(index.classes)))

    def _entry(self, name: str, field: str) -> DatasetEntry:
        entry = self.catalog.get(name)
        if entry is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"{field}: unknown dataset {clip(name)}; this server has: "
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
            release = self.admission.enter()
        except Refused as refusal:  # counted, and logged as a count (augsvc.server.watchdog)
            request_log.debug("refused stream from %s: %s", context.peer(), refusal.details)
            refusal.abort(context)
        # The slot is freed when the call ends, not when this generator returns: the
        # last batches may still be buffered for a slow client, and a draining server
        # must wait for them to be delivered.
        if not context.add_callback(release):
            release()
        try:
            job = self._validate(request)
        except _Abort as abort:
            request_log.info("refused stream from %s: %s: %s", context.peer(), abort.code.name,
                             abort.details[:MAX_DETAILS], extra={
                                 "limit_key": abort.code.name, "peer": context.peer(),
                                 "code": abort.code.name})
            self.metrics.validation_refusal(abort.code)
            context.abort(abort.code, abort.details[:MAX_DETAILS])
        if self._worker:
            context.send_initial_metadata(self._worker)
        req, peer = job.request, context.peer()
        watched = self.watchdog.watch(context)
        progress = {"sent": 0, "failed": False}

        def finished() -> None:
            self.watchdog.unwatch(watched)
            sent, total = progress["sent"], len(job.batches)
            outcome = ("failed" if progress["failed"] else "stalled" if watched.stalled
                       else "cancelled" if sent < total else "done")
            request_log.debug("stream from %s %s: %s, %d of %d batch(es) of %d in %.2f s",
                              peer, outcome, req.dataset, sent, total, req.batch_size,
                              time.monotonic() - started, extra={
                                  "peer": peer, "outcome": outcome, "dataset": req.dataset,
                                  "batches": sent, "batch_size": req.batch_size})
            self.metrics.stream_ended(outcome, total=total, sent=sent,
                                      failed=progress["failed"])

        if not context.add_callback(finished):
            finished()
        cached = [self.cache.get(job.cache_key(k)) for k in job.batches]
        todo = [k for k, frames in zip(job.batches, cached, strict=True) if frames is None]
        work = None  # stays None when every batch is cached: no pipeline needed
        try:
            if todo:
                work = self.pool.attach(job, todo, peer)
                if not context.add_callback(work.close):
                    work.close()
            for frames in cached:
                charge, since = None, time.monotonic()
                if frames is None:
                    made = work.take()
                    if made is None:  # the call was cancelled or the server stopped
                        return
                    frames, charge, since = made.frames, made.charge, made.at
                for frame in frames:
                    watched.blocked_since = time.monotonic()
                    yield frame
                    watched.blocked_since = None
                if work is not None:
                    work.sent(charge)
                progress["sent"] += 1
                self.metrics.stage("send", time.monotonic() - since)
                self.metrics.batch_sent(req.dataset, frames)
        except Exception as exc:
            progress["failed"] = True
            request_log.exception("stream from %s failed at batch %d of %d (dataset %s)", peer,
                                  progress["sent"], len(job.batches), req.dataset)
            details = job.entry.scrub(f"{type(exc).__name__}: {exc}")
            context.abort(grpc.StatusCode.INTERNAL, details[:MAX_DETAILS])
        finally:
            if work is not None:
                work.close()

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
        plan is computed when the scheduler starts it.
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

    # --- shutdown

    @property
    def active_streams(self) -> int:
        return self.admission.active

    def refuse_new_streams(self) -> None:
        """New StreamBatches calls fail with UNAVAILABLE from now on."""
        self.admission.refuse_new()

    def force_drain(self) -> None:
        """Make a running `drain` return now."""
        self._force.set()

    def drain(self, timeout: float) -> int:
        """Wait up to `timeout` s for running streams to end; how many are still running."""
        return self.admission.wait_idle(timeout, self._force)

    def join_streams(self, timeout: float) -> None:
        """Stop the pipelines and wait for their threads (after the calls were cancelled)."""
        self.watchdog.stop()
        self.pool.close()
        self.pool.join(timeout)
