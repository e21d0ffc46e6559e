"""The stream threads behind `AugmentLoader`: one `Fetcher` per pass, its `Stream`s, failover.

One iteration over a loader is one `Fetcher`. It deals the epoch's batches out to
`streams_per_server` threads per server, each on its own gRPC connection:

* A pass's `order` maps positions (the order the consumer wants them) to
  `(epoch, batch)` pairs; one pass may run through several epochs back to back, so
  read-ahead continues across an epoch boundary instead of draining the streams.
* `Schedule` hands out positions lazily: those handed back after a failure first, then
  fresh ones, never at or past `next to yield + readahead`, so at most `readahead`
  batches are requested or buffered ahead of the consumer: memory stays bounded, however
  long the pass. A stream takes a small group of positions of one epoch.
* `Stream` opens one StreamBatches call per group and feeds its frames to a
  `wire.BatchAssembler`, which copies each chunk straight into the output array
  (numpy, or pinned torch memory). On a retryable failure it hands the group's
  unfinished batches back, its server counts the failure and the stream backs off;
  any stream (of any server) may fetch them again: by determinism, the same bytes.
  A server whose calls fail more than `max_retries` times in a row is dead; when no
  live server is left, the consumer gets an `AugsvcError`.
* Statuses that no retry can fix (`FATAL_CODES`) fail the whole iteration at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from augsvc import wire
from augsvc.client.errors import FATAL_CODES, AugsvcError, status
from augsvc.client.schedule import Schedule
from augsvc.client.servers import BACKOFF_MAX_S, ChannelCache, Server, ServerPool
from augsvc.wire._proto import augment_pb2 as pb

__all__ = ["Fetcher", "Stream"]

log = logging.getLogger("augsvc.client")


class Stream(threading.Thread):
    """One connection to one server, fetching groups of batches until none is left."""

    def __init__(self, fetcher: Fetcher, server: Server, slot: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.fetcher, self.server, self.slot = fetcher, server, slot
        self._lock = threading.Lock()
        self._call: Any = None
        self._idle_cancelled = False
        self.last_frame = time.monotonic()

    def run(self) -> None:
        f = self.fetcher
        try:
            stub = wire.AugmentStub(f.channels.get(self.server.target, self.slot))
            alive = lambda: not self.server.dead  # noqa: E731
            while (group := f.schedule.take(f.group_size, alive, f.same_epoch)) is not None:
                delay = self._fetch(stub, group)
                if delay is None and self.server.dead:
                    return
                if delay:
                    f.stop_event.wait(delay)
        except BaseException as exc:  # a bug here must not leave the consumer waiting
            f.schedule.fail(AugsvcError(f"stream {self.name} crashed: {exc!r}"))
            raise
        finally:
            f.schedule.stream_exited(f.no_server_left)

    def _failed(self, unfinished: list[int], reason: str) -> float | None:
        """Hand the unfinished batches back and count the failure against the server."""
        if not unfinished:  # every batch arrived: the next call will tell if the server is gone
            log.info("stream %s ended with %s after its last batch", self.name, reason)
            return None
        log.warning("stream %s failed (%s); batch(es) %s handed back for another stream",
                    self.name, reason, [self.fetcher.order[p] for p in unfinished])
        self.fetcher.schedule.requeue(unfinished)
        return self.server.failed(reason)

    def _fetch(self, stub: wire.AugmentStub, group: list[int]) -> float | None:
        """Fetch one group; a back-off delay after a retryable failure, else None."""
        f = self.fetcher
        unfinished = list(group)
        request = pb.StreamBatchesRequest()
        request.CopyFrom(f.request)
        request.epoch = f.order[group[0]][0]
        request.batches.extend(f.order[p][1] for p in group)
        try:
            call = stub.StreamBatches(request, timeout=f.pool.timeout * (1 + len(group)),
                                      metadata=f.pool.metadata)
            with self._lock:
                self._call, self._idle_cancelled = call, False
                self.last_frame = time.monotonic()
            if f.stop_event.is_set():
                call.cancel()
            assembler = wire.BatchAssembler(f.allocate)
            for frame in call:
                self.last_frame = time.monotonic()
                f.schedule.touch()
                batch = assembler.feed(frame)
                if batch is None:
                    continue
                position = unfinished[0]
                f.check(batch.header, f.order[position][1], self.server.target)
                f.schedule.complete(position, f.finish(batch))
                unfinished.pop(0)
                self.server.succeeded()
            if unfinished:
                raise wire.WireError(f"the stream ended after {len(group) - len(unfinished)} "
                                     f"of {len(group)} batches")
            return None
        except grpc.RpcError as err:
            code, details = status(err)
            if f.stop_event.is_set():
                f.schedule.requeue(unfinished)
                return None
            if code in FATAL_CODES:
                f.schedule.fail(AugsvcError.from_rpc(err, self.server.target, "StreamBatches"))
                return None
            if code is grpc.StatusCode.CANCELLED and self._idle_cancelled:
                return self._failed(unfinished, f"no data for {f.pool.timeout:g} s")
            return self._failed(unfinished, f"{code.name if code else 'UNKNOWN'}: {details}")
        except wire.WireError as err:
            return self._failed(unfinished, f"broken stream: {err}")
        finally:
            with self._lock:
                self._call = None

    def cancel(self) -> None:
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def cancel_if_idle(self, now: float, idle: float) -> None:
        with self._lock:
            if self._call is not None and now - self.last_frame > idle:
                self._idle_cancelled = True
                self._call.cancel()


class Fetcher:
    """One pass over `order` (a rank's `(epoch, batch)` pairs, a `PassOrder` or a list):
    streams, reordering, failover. `request` is the template of every call (its epoch
    and batches are set per call).

    `finish(assembled)` turns an `AssembledBatch` into the item handed to `get`;
    `check(header, batch_number, server)` raises `wire.WireError` for a header that
    does not fit the request; `allocate` is the `BatchAssembler`'s allocator.
    """

    def __init__(
        self,
        pool: ServerPool,
        request: pb.StreamBatchesRequest,
        order: Sequence[tuple[int, int]],
        *,
        channels: ChannelCache,
        streams_per_server: int,
        group_size: int,
        readahead: int,
        allocate: wire.Allocate | None,
        finish: Callable[[wire.AssembledBatch], Any],
        check: Callable[[pb.BatchHeader, int, str], None],
    ) -> None:
        self.pool, self.request, self.order = pool, request, order
        self.channels = channels
        self.group_size = group_size
        self.allocate, self.finish, self.check = allocate, finish, check
        self.schedule = Schedule(len(self.order), readahead)
        self.stop_event = threading.Event()
        self.servers = [Server(t, pool.max_retries) for t in pool.targets]
        self.streams = [
            Stream(self, server, i, f"augsvc-stream-{server.target}-{i}")
            for i in range(streams_per_server) for server in self.servers
        ]
        self._started = False

    def start(self) -> None:
        if self._started or not self.order:
            return
        self._started = True
        for stream in self.streams:
            self.schedule.stream_started()
            stream.start()

    def __len__(self) -> int:
        return len(self.order)

    def same_epoch(self, a: int, b: int) -> bool:
        """Whether positions a and b may share a call (one request has one epoch)."""
        return self.order[a][0] == self.order[b][0]

    def get(self, position: int) -> Any:
        """The finished batch at `position` of `order`, waiting for it (no hang: see watch)."""
        self.start()
        return self.schedule.get(position, self._watch)

    def _watch(self, stalled: float) -> None:
        """Abandon calls that went quiet; give up when nothing at all happens for too long."""
        now = time.monotonic()
        for stream in self.streams:
            stream.cancel_if_idle(now, self.pool.timeout)
        if stalled > 3 * self.pool.timeout + 2 * BACKOFF_MAX_S:
            self.schedule.fail(AugsvcError(f"no progress for {stalled:.0f} s"))

    def no_server_left(self) -> AugsvcError:
        reasons = "; ".join(f"{s.target}: {s.last_error or 'no error'}" for s in self.servers)
        return AugsvcError(
            f"every augsvc server failed (each given up after {self.pool.max_retries + 1} "
            f"failures in a row): {reasons}",
            code=grpc.StatusCode.UNAVAILABLE,
        )

    def close(self, join_timeout: float = 10.0) -> None:
        """Cancel every call and join the stream threads."""
        self.stop_event.set()
        self.schedule.close()
        for stream in self.streams:
            stream.cancel()
        deadline = time.monotonic() + join_timeout
        for stream in self.streams:
            if stream.is_alive():
                stream.join(max(0.0, deadline - time.monotonic()))
