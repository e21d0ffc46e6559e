"""`Fetcher`: one pass of a loader: its streams, the replica set, and the supervisor.

One iteration over a loader is one `Fetcher`. It keeps `streams_per_server` `Stream`
threads per server address, each on its own gRPC connection, fetching disjoint groups
of batches that the `Schedule` hands out (at most `readahead` ahead of the consumer).

* **Discovery.** The addresses come from `ServerPool.discovery()`: every address of
  every target, resolved again every `resolve_interval` s and soon after a failure.
  A new address gets its streams at once; the streams of an address that left finish
  their call and stop (what they did not deliver goes back to the queue).
* **Workers.** A server of several worker processes on one port (`augsvc serve
  --workers N`) names the worker of each call; streams that crowd one worker re-dial
  between calls until the address's streams are spread evenly over its workers
  (`augsvc.client.placement`), so that each loader gets its share of every worker.
* **Supervisor.** A thread checks every stream each WATCH_INTERVAL_S. A stream whose
  call has its status while gRPC's iterator has not returned for STUCK_AFTER_S (a
  grpcio bug: scripts/grpc_stuck_call.py), or that has received nothing for `timeout`
  s, is abandoned: its batches go back to the queue, its channel is replaced (closing
  the old one in the background frees the stuck call), and a new stream takes its
  place. The consumer never waits for the old thread.
* **Giving up.** Only when no server has answered for `reconnect_timeout` s (every
  address failing, or none resolved) does the consumer get an `AugsvcError`; until
  then the streams retry with back-off, and the wait is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from augsvc import wire
from augsvc.client.discovery import Endpoint
from augsvc.client.errors import AugsvcError
from augsvc.client.schedule import WATCH_INTERVAL_S, Schedule
from augsvc.client.servers import ChannelCache, Server, ServerPool
from augsvc.client.stats import StatsRecorder
from augsvc.client.streams import Stream
from augsvc.wire._proto import augment_pb2 as pb

__all__ = ["STUCK_AFTER_S", "Fetcher", "default_readahead"]

log = logging.getLogger("augsvc.client")

STUCK_AFTER_S = 1.0  # a call with a status whose iterator has not returned this long is stuck
RESOLVE_MIN_GAP_S = 1.0  # re-resolution after a failure: at most this often


def default_readahead(streams: int, group_size: int) -> int:
    """The read-ahead of a pass without `prefetch`: (group_size + 1) batches per live stream."""
    return max(1, streams) * (group_size + 1)


class Fetcher:
    """One pass over `order` (a rank's `(epoch, batch)` pairs, a `PassOrder` or a list):
    streams, reordering, failover, discovery. `request` is the template of every call
    (its epoch and batches are set per call).

    `finish(assembled)` turns an `AssembledBatch` into the item handed to `get`;
    `check(header, batch_number, server)` raises `wire.WireError` for a header that
    does not fit the request; `allocate` is the `BatchAssembler`'s allocator;
    `readahead` None: (batches_per_request + 1) per live stream.
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
        readahead: int | None,
        allocate: wire.Allocate | None,
        finish: Callable[[wire.AssembledBatch], Any],
        check: Callable[[pb.BatchHeader, int, str], None],
        stats: StatsRecorder,
    ) -> None:
        self.pool, self.request, self.order = pool, request, order
        self.channels, self.stats = channels, stats
        self.streams_per_server, self.group_size = streams_per_server, group_size
        self.allocate, self.finish, self.check = allocate, finish, check
        self._readahead = readahead
        self.schedule = Schedule(len(order), readahead or default_readahead(1, group_size))
        self.stop_event = threading.Event()
        self.discovery = pool.discovery()
        self.servers: dict[str, Server] = {}  # the current replica set, by address
        self.streams: list[Stream] = []  # live (not yet exited, not abandoned)
        self._lock = threading.Lock()
        self._none_since: float | None = None  # when the set became empty
        self._waiting_since: float | None = None  # when "no server answers" was logged
        self._threads: list[threading.Thread] = []
        self._started = False

    def __len__(self) -> int:
        return len(self.order)

    def same_epoch(self, a: int, b: int) -> bool:
        """Whether positions a and b may share a call (one request has one epoch)."""
        return self.order[a][0] == self.order[b][0]

    # -- the consumer side ------------------------------------------------------------

    def start(self) -> None:
        if self._started or not self.order:
            return
        self._apply(self.discovery.resolve())
        self._started = True
        loops = [("augsvc-supervisor", self._supervise)]
        if self.discovery.dynamic:
            loops.append(("augsvc-discovery", self._rediscover))
        for name, target in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def get(self, position: int) -> Any:
        """The finished batch at `position` of `order`, waiting for it (time counted as
        the trainer's wait in `stats`)."""
        begin = time.monotonic()
        try:
            self.start()
            item = self.schedule.get(position)
        finally:
            self.stats.waited(time.monotonic() - begin)
        self.stats.yielded()
        return item

    def close(self, join_timeout: float = 5.0) -> None:
        """Cancel every call, join the threads; a stream that does not end soon has its
        channel replaced (that frees a call gRPC left hanging) and is left behind."""
        self.stop_event.set()
        self.schedule.close()
        with self._lock:
            streams = list(self.streams)
        for stream in streams:
            stream.cancel()
        deadline = time.monotonic() + join_timeout
        for stream in streams:
            stream.join(min(1.0, max(0.0, deadline - time.monotonic())))
            if stream.is_alive():
                self.channels.replace(stream.server.endpoint, stream.slot, stream.channel)
                stream.join(max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the replica set --------------------------------------------------------------

    def discovery_wanted(self) -> None:
        """A failure: look the names up again soon (a replica may have moved)."""
        self.discovery.request()

    def _apply(self, endpoints: list[Endpoint]) -> None:
        """Make the streams follow the resolved set: start new addresses, retire gone ones."""
        with self._lock:
            if self.stop_event.is_set():
                return
            current = {e.address for e in endpoints}
            for address in [a for a in self.servers if a not in current]:
                server = self.servers.pop(address)
                log.info("augsvc server %s left %s: its streams finish their call and stop",
                         address, server.endpoint.name)
                for stream in self.streams:
                    if stream.server is server:
                        stream.retired = True
            for endpoint in endpoints:
                if endpoint.address in self.servers:
                    continue
                if self._started:
                    log.info("augsvc server %s joined %s", endpoint.address, endpoint.name)
                server = self.servers[endpoint.address] = Server(endpoint, self.streams_per_server)
                for slot in range(self.streams_per_server):
                    self._start_stream(Stream(self, server, slot))
            if self.servers:
                self._none_since = None
            else:  # nothing to connect to: look again soon
                self._none_since = self._none_since or time.monotonic()
                self.discovery.request()
            self._resize()

    def _start_stream(self, stream: Stream) -> None:
        self.streams.append(stream)
        stream.start()

    def _resize(self) -> None:
        if self._readahead is None and self.streams:
            live = sum(not s.retired for s in self.streams)
            self.schedule.set_readahead(default_readahead(live, self.group_size))

    def stream_exited(self, stream: Stream) -> None:
        with self._lock:
            if stream in self.streams:
                self.streams.remove(stream)
            address = stream.server.target
            gone = address not in self.servers and not any(
                s.server.target == address for s in self.streams)
        if gone and stream.retired and not self.stop_event.is_set():
            self.channels.drop(address)

    def _rediscover(self) -> None:
        while not self.stop_event.wait(WATCH_INTERVAL_S) and not self.schedule.finished:
            if self.discovery.due(time.monotonic(), RESOLVE_MIN_GAP_S):
                self._apply(self.discovery.resolve())

    # -- the supervisor ---------------------------------------------------------------

    def _supervise(self) -> None:
        while not self.stop_event.wait(WATCH_INTERVAL_S) and not self.schedule.finished:
            now = time.monotonic()
            with self._lock:
                streams = list(self.streams)
            for stream in streams:
                why = self._stuck(stream, now)
                if why:
                    self._abandon(stream, why)
            self._check_budget(now)

    def _stuck(self, stream: Stream, now: float) -> str | None:
        """Why `stream` must be abandoned, or None."""
        call = stream.call
        if call is None or stream.abandoned:
            stream.ended_seen = None
            return None
        if stream.in_next and call.done():
            seen = stream.ended_seen
            if seen is None or seen[0] is not call:
                stream.ended_seen = (call, now)
            elif now - seen[1] > STUCK_AFTER_S:
                return (f"its call ended ({call.code().name}: {call.details()}) but gRPC's "
                        f"iterator did not return for {STUCK_AFTER_S:g} s")
            return None
        if now - stream.last_frame > self.pool.timeout:
            call.cancel()
            return f"no data for {self.pool.timeout:g} s"
        return None

    def _abandon(self, stream: Stream, why: str) -> None:
        """Hand its batches back, replace it (new thread, new connection), let it go."""
        stream.abandoned = True
        handed_back = self.schedule.abandon(stream)
        self.stats.failed(stream.server.target, handed_back, abandoned=True)
        stream.server.failed(why)
        log.warning("stream %s abandoned: %s; %d batch(es) handed back, a new stream on a new "
                    "connection replaces it", stream.name, why, handed_back)
        self.channels.replace(stream.server.endpoint, stream.slot, stream.channel)
        with self._lock:
            if stream in self.streams:
                self.streams.remove(stream)
            if self.servers.get(stream.server.target) is stream.server \
                    and not self.stop_event.is_set():
                self._start_stream(Stream(self, stream.server, stream.slot,
                                          failures=stream.failures + 1))

    def _check_budget(self, now: float) -> None:
        """Log once when no server answers; fail the pass after `reconnect_timeout` s."""
        with self._lock:
            servers = list(self.servers.values())
            none_since = self._none_since
        failing = [s.failing_since for s in servers if s.failing_since is not None]
        if servers and len(failing) < len(servers):
            if self._waiting_since is not None:
                log.info("augsvc servers answer again after %.1f s", now - self._waiting_since)
                self._waiting_since = None
            return
        since = max(failing) if servers else (none_since or now)
        reasons = "; ".join([f"{s.target}: {s.last_error}" for s in servers]
                            + list(self.discovery.errors.values())) or "no address"
        budget = self.pool.reconnect_timeout
        if now - since >= budget:
            if servers and all(s.busy for s in servers) and not self.discovery.errors:
                error = AugsvcError(
                    f"every augsvc server refused the streams as full for {budget:g} s "
                    f"(reconnect_timeout): {reasons}; raise their --max-streams, add "
                    f"replicas, or open fewer streams (streams_per_server)",
                    code=grpc.StatusCode.RESOURCE_EXHAUSTED)
            else:
                error = AugsvcError(f"no augsvc server answered for {budget:g} s "
                                    f"(reconnect_timeout): {reasons}",
                                    code=grpc.StatusCode.UNAVAILABLE)
            self.schedule.fail(error)
        elif self._waiting_since is None:
            self._waiting_since = since
            log.warning("no augsvc server answers (%s); waiting up to %g s for one to come "
                        "back (names are looked up again every %g s)", reasons, budget,
                        self.pool.resolve_interval)
