"""The server's Prometheus series (`augsvc_*`), recorded by the workers and the parent.

Every worker is a forked process, and a worker that dies takes its memory with it, so
the series live in prometheus_client's multiprocess mode: each process writes its
values to memory-mapped files in one directory (`PROMETHEUS_MULTIPROC_DIR`, made by
`augsvc.server.exporter`, which also sums them for `/metrics`). Counters and
histograms of a dead worker stay in the sums (totals never go back when a worker is
replaced); the gauges are "livesum" (the sum over live processes: the parent drops a
dead worker's files with `mark_process_dead`). Without that directory the values are
plain in-process ones, readable from `ServerMetrics.registry` (an in-process server).

Batch latency (`augsvc_batch_seconds{stage}`), one batch's whole time in the server:
`queue` from the moment its stream could take one more batch (room in `--prefetch`)
until the pipeline starts it (other streams first, the memory budget full); `pipeline`
from start to frames encoded; `send` from then until gRPC has taken its last frame
(behind the stream's earlier batches, then the client's reading pace). Batches sent
from the batch cache have only a `send` stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from augsvc.wire._proto import augment_pb2 as pb

__all__ = ["BATCH_OUTCOMES", "REFUSAL_REASONS", "STAGES", "STREAM_OUTCOMES", "ServerMetrics",
           "SupervisorMetrics", "sample_reason"]

STAGES = ("queue", "pipeline", "send")
BATCH_OUTCOMES = ("sent", "failed", "unsent")
STREAM_OUTCOMES = ("done", "cancelled", "stalled", "failed")
# why a stream was refused: admission's own reasons, and a failed validation's status
REFUSAL_REASONS = ("max_streams", "draining", "invalid", "unknown_dataset", "batch_too_large",
                   "no_stats")
_VALIDATION_REASONS = {
    grpc.StatusCode.UNAVAILABLE: "draining",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "unknown_dataset",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "batch_too_large",
    grpc.StatusCode.FAILED_PRECONDITION: "no_stats",
}
# why a sample was unusable, from the start of the engine's reason text
SAMPLE_REASONS = ("unreadable", "refused", "undecodable", "invalid")
_REASON_PREFIXES = (("unreadable", "unreadable"), ("decode failed", "undecodable"),
                    *((prefix, "refused") for prefix in (  # augsvc.engine.files' rules
                        "not a regular file", "replaced while", "resolves outside",
                        "changed since")))
# 1 ms .. 60 s: a small CPU batch takes milliseconds, a large one behind a slow client seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


def sample_reason(reason: str) -> str:
    """The label of an unusable sample's reason: unreadable; refused (the dataset's file
    rules: not a regular file, outside the root, changed since indexing); undecodable;
    or invalid (the file's bytes fail the header checks: empty, truncated, not an image)."""
    for prefix, label in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return label
    return "invalid"


class ServerMetrics:
    """A worker's series (module doc); `registry` holds them for an in-process server."""

    def __init__(self, datasets: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sent_images = Counter("augsvc_sent_images", "Images sent to clients.",
                                   ["dataset"], registry=r)
        self.sent_bytes = Counter("augsvc_sent_bytes", "Bytes of frames handed to gRPC "
                                  "(batch headers and pixel chunks).", ["dataset"], registry=r)
        self.batches = Counter("augsvc_batches", "Batches asked for by admitted streams, by "
                               "outcome: sent; failed (the pipeline or its encoding failed); "
                               "unsent (the stream ended before them).", ["outcome"],
                               registry=r)
        self.dropped = Counter("augsvc_dropped_samples", "Unusable samples left out of the "
                               "batches sent, by reason.", ["reason"], registry=r)
        self.substituted = Counter("augsvc_substituted_samples", "Unusable samples replaced "
                                   "by a stand-in in the batches sent, by reason.", ["reason"],
                                   registry=r)
        self.streams = Counter("augsvc_streams", "Admitted StreamBatches calls that ended, by "
                               "outcome: done, cancelled (by the client or the server "
                               "stopping), stalled (--stall-timeout), failed.", ["outcome"],
                               registry=r)
        self.refused = Counter("augsvc_refused_streams", "StreamBatches calls refused, by "
                               "reason: max_streams, draining, or a request that failed "
                               "validation.", ["reason"], registry=r)
        self.active = Gauge("augsvc_active_streams", "StreamBatches calls running.",
                            registry=r, multiprocess_mode="livesum")
        self.batch_seconds = Histogram("augsvc_batch_seconds", "Seconds a batch spent in "
                                       "each stage: queue, pipeline, send.", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.pipelines = Gauge("augsvc_pipelines", "DALI pipelines kept by the workers "
                               "(in use or idle).", registry=r, multiprocess_mode="livesum")
        self.pipelines_built = Counter("augsvc_pipelines_built", "DALI pipelines built.",
                                       registry=r)
        self.prefetched = Gauge("augsvc_prefetched_bytes", "Bytes of batches being made or "
                                "not yet sent, against --max-memory.", registry=r,
                                multiprocess_mode="livesum")
        self.prefetch_limit = Gauge("augsvc_prefetch_limit_bytes", "--max-memory of the "
                                    "workers, summed.", registry=r, multiprocess_mode="livesum")
        self._stages = {stage: self.batch_seconds.labels(stage) for stage in STAGES}
        for labels, values in ((self.batches, BATCH_OUTCOMES), (self.streams, STREAM_OUTCOMES),
                               (self.refused, REFUSAL_REASONS), (self.dropped, SAMPLE_REASONS),
                               (self.substituted, SAMPLE_REASONS),
                               (self.sent_images, datasets), (self.sent_bytes, datasets)):
            for value in values:  # every series exists from the start, at 0
                labels.labels(value)

    def stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    def refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def validation_refusal(self, code: grpc.StatusCode) -> None:
        self.refusal(_VALIDATION_REASONS.get(code, "invalid"))

    def batch_sent(self, dataset: str, frames: Sequence[bytes]) -> None:
        """A batch's frames are all with gRPC: count its images, bytes and bad samples."""
        header = pb.Frame.FromString(frames[0]).header
        self.sent_images.labels(dataset).inc(header.shape[0] if header.shape else 0)
        self.sent_bytes.labels(dataset).inc(sum(len(frame) for frame in frames))
        self.batches.labels("sent").inc()
        for sample in header.dropped:
            self.dropped.labels(sample_reason(sample.reason)).inc()
        for substitution in header.substituted:
            self.substituted.labels(sample_reason(substitution.reason)).inc()

    def stream_ended(self, outcome: str, *, total: int, sent: int, failed: bool) -> None:
        """An admitted stream ended: its outcome, and its batches that were not sent."""
        self.streams.labels(outcome).inc()
        if failed:
            self.batches.labels("failed").inc()
        unsent = total - sent - int(failed)
        if unsent > 0:
            self.batches.labels("unsent").inc(unsent)


class SupervisorMetrics:
    """The parent's series: its workers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.restarts = Counter("augsvc_worker_restarts", "Worker processes that exited "
                                "unexpectedly and were replaced.", registry=r)
        self.workers = Gauge("augsvc_workers", "Worker processes running.", registry=r,
                             multiprocess_mode="livesum")
