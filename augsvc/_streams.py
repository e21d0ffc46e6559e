"""The machinery behind `AugmentLoader`: connections, stream threads, retries, reordering.

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

import heapq
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from augsvc import wire
from augsvc._proto import augment_pb2 as pb

__all__ = ["FATAL_CODES", "AugsvcError", "Fetcher", "ServerPool"]

log = logging.getLogger("augsvc.client")

# Statuses a retry on another stream or server cannot fix: fail at once.
FATAL_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
})
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
WATCH_INTERVAL_S = 0.2


class AugsvcError(RuntimeError):
    """A request augsvc could not serve.

    `code` is the `grpc.StatusCode` (None for a failure without one, e.g. a broken
    stream), `details` the server's own message, `server` the "host:port" that
    answered (None when the error concerns every server).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: str | None = None,
        server: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.details, self.server = code, details, server

    def __reduce__(self) -> tuple[Any, ...]:  # keep the attributes across processes
        return (_rebuild_error, (str(self), self.code, self.details, self.server))

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, server: str, what: str) -> AugsvcError:
        """Wrap a failed call: "<what> on <server> failed: CODE: details"."""
        code, details = _status(err)
        name = code.name if code is not None else "UNKNOWN"
        return cls(f"{what} on {server} failed: {name}: {details}",
                   code=code, details=details, server=server)


AugsvcError.__module__ = "augsvc"  # its public home: augsvc.AugsvcError


def _rebuild_error(message: str, code: Any, details: Any, server: Any) -> AugsvcError:
    return AugsvcError(message, code=code, details=details, server=server)


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    return code, details or str(err)


# ---------------------------------------------------------------------------
# servers and connections


class Server:
    """One server address: its failures in a row, and whether it is given up."""

    def __init__(self, target: str, max_retries: int) -> None:
        self.target, self.max_retries = target, max_retries
        self.failures = 0
        self.dead = False
        self.last_error: str = ""
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0

    def failed(self, reason: str) -> float | None:
        """Count a failure; the back-off before the next try, or None once dead."""
        with self._lock:
            self.failures += 1
            self.last_error = reason
            if self.failures > self.max_retries:
                if not self.dead:
                    log.error("augsvc server %s given up after %d failures in a row: %s",
                              self.target, self.failures, reason)
                self.dead = True
                return None
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self.failures - 1))
        return delay * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class ServerPool:
    """Addresses and how to connect to them (picklable; channels are made per use)."""

    targets: tuple[str, ...]
    root_certificates: bytes | None = None
    token: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    client_certificate: tuple[bytes, bytes] | None = None  # (chain, key) for mutual TLS

    def channel(self, target: str) -> grpc.Channel:
        """A channel on its own connection (distinct args, no shared subchannel pool)."""
        options = wire.channel_options(own_connection=True)
        if self.root_certificates is not None:
            chain, key = self.client_certificate or (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                                 private_key=key, certificate_chain=chain)
            return grpc.secure_channel(target, creds, options=options)
        return grpc.insecure_channel(target, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def get_dataset(self, name: str, stats: str) -> pb.DatasetInfo:
        """GetDataset from the first server that answers (each tried with retries)."""
        errors = []
        for target in self.targets:
            server = Server(target, self.max_retries)
            with self.channel(target) as channel:
                stub = wire.AugmentStub(channel)
                while True:
                    try:
                        return stub.GetDataset(
                            pb.GetDatasetRequest(name=name, stats=stats),
                            timeout=self.timeout, metadata=self.metadata,
                        )
                    except grpc.RpcError as err:
                        code, details = _status(err)
                        if code in FATAL_CODES:
                            raise AugsvcError.from_rpc(err, target, "GetDataset") from None
                        delay = server.failed(f"{code.name if code else 'UNKNOWN'}: {details}")
                        if delay is None:
                            errors.append((target, code, server.last_error))
                            break
                        time.sleep(delay)
        summary = "; ".join(f"{t}: {why}" for t, _, why in errors)
        raise AugsvcError(
            f"no augsvc server answered GetDataset({name!r}) after {self.max_retries + 1} "
            f"tries each: {summary}",
            code=errors[-1][1],
        )


# ---------------------------------------------------------------------------
# scheduling


class Schedule:
    """Positions to fetch, reorder buffer and read-ahead limit, under one condition."""

    def __init__(self, count: int, readahead: int) -> None:
        self.count, self.readahead = count, readahead
        self.cond = threading.Condition()
        self.fresh = 0  # positions below this were handed out (at least once)
        self.retry: list[int] = []  # a heap of positions handed back
        self.done: dict[int, Any] = {}
        self.next = 0  # the position the consumer waits for
        self.error: BaseException | None = None
        self.closed = False
        self.live_streams = 0
        self.last_progress = time.monotonic()

    def take(self, n: int, alive: Callable[[], bool],
             together: Callable[[int, int], bool]) -> list[int] | None:
        """Up to n lowest positions to fetch below the read-ahead limit, each one
        `together(first, p)` with the first; None: stop."""
        with self.cond:
            while True:
                if self.closed or self.error is not None or not alive():
                    return None
                if self.next >= self.count:
                    return None
                limit = min(self.next + self.readahead, self.count)
                group: list[int] = []
                while len(group) < n:
                    retry = bool(self.retry) and self.retry[0] < limit
                    if not retry and self.fresh >= limit:
                        break
                    p = self.retry[0] if retry else self.fresh
                    if group and not together(group[0], p):
                        break
                    if retry:
                        heapq.heappop(self.retry)
                    else:
                        self.fresh += 1
                    group.append(p)
                if group:
                    return group
                self.cond.wait(WATCH_INTERVAL_S)

    def complete(self, position: int, item: Any) -> None:
        with self.cond:
            if position >= self.next and position not in self.done:
                self.done[position] = item
            self.last_progress = time.monotonic()
            self.cond.notify_all()

    def requeue(self, positions: Sequence[int]) -> None:
        with self.cond:
            for p in positions:
                heapq.heappush(self.retry, p)
            self.last_progress = time.monotonic()
            self.cond.notify_all()

    def touch(self) -> None:
        self.last_progress = time.monotonic()  # a plain store: no lock needed

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def stream_started(self) -> None:
        with self.cond:
            self.live_streams += 1

    def stream_exited(self, no_server_left: Callable[[], AugsvcError]) -> None:
        with self.cond:
            self.live_streams -= 1
            if (self.live_streams == 0 and not self.closed and self.error is None
                    and self.next < self.count):
                self.error = no_server_left()
            self.cond.notify_all()

    def get(self, position: int, watch: Callable[[float], None]) -> Any:
        """The item at `position` (the consumer's next); raises the iteration's error.

        `watch(stalled_s)` runs every WATCH_INTERVAL_S while waiting; `stalled_s` is the
        time since anything happened (a frame, a requeue) or the wait began.
        """
        with self.cond:
            since = time.monotonic()
            while position not in self.done:
                if self.error is not None:
                    raise self.error
                self.cond.wait(WATCH_INTERVAL_S)
                watch(time.monotonic() - max(since, self.last_progress))
            self.next = position + 1
            self.cond.notify_all()
            return self.done.pop(position)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.done.clear()
            self.cond.notify_all()


class PassOrder(Sequence[tuple[int, int]]):
    """The `(epoch, batch)` pairs of a pass, computed on demand: `epochs` epochs (None:
    without end) of `batches` batches each from epoch `epoch`, the first starting at
    batch `start`, the others at 0."""

    def __init__(self, epoch: int, batches: int, start: int = 0, epochs: int | None = 1
                 ) -> None:
        if not 0 <= start <= batches:
            raise ValueError(f"start {start} is outside an epoch of {batches} batches")
        self.epoch, self.batches, self.start = epoch, batches, start
        if batches == 0 or epochs == 0:
            self._len = 0
        elif epochs is None:
            self._len = sys.maxsize
        else:
            self._len = epochs * batches - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, position: int) -> tuple[int, int]:  # type: ignore[override]
        if not 0 <= position < self._len:
            raise IndexError(position)
        epochs, batch = divmod(self.start + position, self.batches)
        return self.epoch + epochs, batch


# ---------------------------------------------------------------------------
# streams


class ChannelCache:
    """The loader's connections, kept across passes (epochs): one per (server, stream slot).

    Reconnecting (TCP + HTTP/2, and TLS) every epoch would cost each pass a round of
    handshakes; a gRPC channel reconnects by itself after a failure.
    """

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.pid = os.getpid()  # a forked child (DataLoader worker) must make its own
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, target: str, slot: int) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get((target, slot))
            if channel is None:
                channel = self._channels[target, slot] = self.pool.channel(target)
            return channel

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


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
            code, details = _status(err)
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


def pem_bytes(root_certificates: bytes | str | Any | None) -> bytes | None:
    """PEM bytes from bytes, PEM text or a path."""
    if root_certificates is None or isinstance(root_certificates, bytes):
        return root_certificates
    if isinstance(root_certificates, str) and root_certificates.lstrip().startswith("-----BEGIN"):
        return root_certificates.encode()
    with open(root_certificates, "rb") as fh:
        return fh.read()


def empty_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)
