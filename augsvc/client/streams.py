"""`Stream`: one thread on one connection to one server address, fetching groups of batches.

A stream takes a small group of positions of one epoch from the pass's `Schedule`,
opens one StreamBatches call for them and feeds its frames to a `wire.BatchAssembler`,
which copies each chunk straight into the output array (numpy, or pinned torch
memory). On a retryable failure it hands the group's unfinished batches back (any
stream of any server fetches them again: by determinism, the same bytes), backs off
(capped exponential, jitter), and asks the server something small before it takes
work again, so a dead or unreachable server holds no batches. Statuses no retry can fix
(`FATAL_CODES`) fail the whole pass at once, unless the server marked its refusal as
one that waiting fixes (full or draining: `augsvc.client.errors.retry_hint`), which is
retried like any other failure and counted in `loader.stats().retries`.

Once a call's first frame is in, the stream notes which worker of its server serves it
(the call's initial metadata, `wire.WORKER_KEY`, read only then: it has arrived by then);
between two calls it re-dials, on a new connection, when its server's `Placement` says
that this loader's streams crowd one worker (`augsvc.client.placement`). No batch is
lost or fetched twice by that: the finished call delivered all its batches, and the next
one has not started.

Nothing waits on a stream: the `Fetcher`'s supervisor may `abandon` one whose call
ended without its iterator returning (a grpcio bug, scripts/grpc_stuck_call.py) or
that went silent, and from then on the stream's thread changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc

from augsvc import wire
from augsvc.client.errors import AugsvcError, fatal, retry_hint, status
from augsvc.client.placement import REDIAL_LIMIT
from augsvc.client.servers import BACKOFF_MAX_S, Server, backoff_delay
from augsvc.wire._proto import augment_pb2 as pb

if TYPE_CHECKING:
    from augsvc.client.fetcher import Fetcher

__all__ = ["Stream"]

log = logging.getLogger("augsvc.client")

# A call cut off because its connection reached the server's maximum age (past the
# grace period): routine; retried at once and logged at INFO.
_ROUTINE = "max connection age"
_READY_POLL_S = 0.1  # how often a wait for the server checks whether to give up


class Stream(threading.Thread):
    """One connection to one server address, fetching groups of batches until none is
    left, its server leaves (`retired`) or the supervisor replaces it (`abandoned`)."""

    def __init__(self, fetcher: Fetcher, server: Server, slot: int, failures: int = 0) -> None:
        super().__init__(name=f"augsvc-stream-{server.target}-{slot}", daemon=True)
        self.fetcher, self.server, self.slot = fetcher, server, slot
        self.channel = fetcher.channels.get(server.endpoint, slot)
        self.failures = failures  # calls failed in a row (back-off)
        self.retired = False  # its address left discovery: finish the call, take no more
        self.abandoned = False  # replaced: nothing it does counts any more
        self._lock = threading.Lock()
        self.call: Any = None
        self.in_next = False  # inside gRPC's iterator
        self.last_frame = time.monotonic()
        self.ended_seen: tuple[Any, float] | None = None  # the supervisor's: (call, when)

    @property
    def wanted(self) -> bool:
        return not (self.retired or self.abandoned or self.fetcher.stop_event.is_set())

    def run(self) -> None:
        f = self.fetcher
        try:
            stub = wire.AugmentStub(self.channel)
            delivered = False  # the last call delivered every batch it asked for
            while self.wanted and not f.schedule.finished:
                if self.failures and not self._wait_for_server(stub):
                    continue
                group = f.schedule.take(self, f.group_size, lambda: self.wanted, f.same_epoch)
                if group is None:
                    return
                if delivered and self._redial():
                    stub = wire.AugmentStub(self.channel)
                delivered = self._fetch(stub, group)
        except BaseException as exc:  # a bug here must not leave the consumer waiting
            if not self.abandoned:
                f.schedule.fail(AugsvcError(f"stream {self.name} crashed: {exc!r}"))
            raise
        finally:
            f.stream_exited(self)

    def _wait_for_server(self, stub: wire.AugmentStub) -> bool:
        """Back off, then ask the server something small (ListDatasets, waiting up to
        BACKOFF_MAX_S for a connection): True once it answers, whatever it answers."""
        f = self.fetcher
        if f.stop_event.wait(backoff_delay(self.failures)) or not self.wanted:
            return False
        probe = stub.ListDatasets.future(pb.ListDatasetsRequest(), timeout=BACKOFF_MAX_S,
                                         metadata=f.pool.metadata, wait_for_ready=True)
        try:
            while self.wanted:
                try:
                    probe.result(timeout=_READY_POLL_S)
                    return True
                except grpc.FutureTimeoutError:
                    continue
                except grpc.RpcError as err:
                    code, _ = status(err)
                    if code not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                        return True  # it answered: the call itself will say what is wrong
                    self.failures += 1
                    return False
            return False
        except (grpc.FutureCancelledError, ValueError):  # the channel was closed
            return False
        finally:
            probe.cancel()

    def _redial(self) -> bool:
        """Between two calls: replace the connection if the server's worker placement says
        so (`augsvc.client.placement`); True if it was replaced."""
        f, placement = self.fetcher, self.server.placement
        loads = placement.loads()
        attempt = placement.redial(self.slot)
        if not attempt:
            return False
        log.debug("stream %s re-dials (attempt %d of %d): the workers of %s serve %s of "
                  "this loader's streams", self.name, attempt, REDIAL_LIMIT,
                  self.server.target, list(loads))
        f.channels.replace(self.server.endpoint, self.slot, self.channel)
        self.channel = f.channels.get(self.server.endpoint, self.slot)
        f.stats.redialed(self.server.target)
        return True

    def _landed(self, call: Any) -> None:
        """After a call's first frame (its initial metadata is in by then): note which
        worker serves it. Marked as inside gRPC, like `next`, for the supervisor."""
        self.in_next = True
        try:
            worker = wire.parse_worker(call.initial_metadata())
        finally:
            self.in_next = False
        if worker is not None:
            self.server.placement.landed(self.slot, worker)
            self.fetcher.stats.placed(self.server.target, self.server.placement.loads())

    def _fetch(self, stub: wire.AugmentStub, group: list[int]) -> bool:
        """One call for `group`; True if it delivered every batch."""
        f = self.fetcher
        address = self.server.target
        unfinished = list(group)
        request = pb.StreamBatchesRequest()
        request.CopyFrom(f.request)
        request.epoch = f.order[group[0]][0]
        request.batches.extend(f.order[p][1] for p in group)
        f.stats.call_started(address)
        try:
            call = stub.StreamBatches(request, timeout=f.pool.timeout * (1 + len(group)),
                                      metadata=f.pool.metadata)
            with self._lock:
                self.call, self.last_frame = call, time.monotonic()
            if f.stop_event.is_set() or self.abandoned:
                call.cancel()
            assembler = wire.BatchAssembler(f.allocate)
            first = True
            while True:
                self.in_next = True
                try:
                    frame = next(call)
                except StopIteration:
                    break
                finally:
                    self.in_next = False
                if self.abandoned:
                    return False
                if first:
                    first = False
                    self._landed(call)
                self.last_frame = time.monotonic()
                batch = assembler.feed(frame)
                if batch is None:
                    continue
                position = unfinished[0]
                f.check(batch.header, f.order[position][1], address)
                if not f.schedule.complete(self, position, f.finish(batch)):
                    return False  # abandoned meanwhile
                unfinished.pop(0)
                f.stats.received(address, len(batch.array), batch.array.nbytes)
                self._answered()
            if unfinished:
                raise wire.WireError(f"the stream ended after {len(group) - len(unfinished)} "
                                     f"of {len(group)} batches")
            return True
        except grpc.RpcError as err:
            if self.abandoned:
                return False
            code, details = status(err)
            if f.stop_event.is_set():
                f.schedule.requeue(self, unfinished)
            elif fatal(err):
                f.schedule.fail(AugsvcError.from_rpc(err, address, "StreamBatches"))
            else:
                hint = retry_hint(err)
                self._failed(unfinished, f"{code.name if code else 'UNKNOWN'}"
                             f"{f' (server {hint})' if hint else ''}: {details}",
                             busy=hint == wire.RETRY_BUSY)
        except wire.WireError as err:
            if not self.abandoned:
                self._failed(unfinished, f"broken stream: {err}")
        except AugsvcError as err:  # the check found what no retry mends
            self.cancel()
            if not self.abandoned:
                f.schedule.fail(err)
        finally:
            with self._lock:
                self.call = None
            f.stats.call_ended(address)
        return False

    def _answered(self) -> None:
        self.failures = 0
        down = self.server.answered()
        if down is not None:
            self.fetcher.stats.reconnected(self.server.target)
            log.info("augsvc server %s answers again (after %.1f s)", self.server.target, down)

    def _failed(self, unfinished: list[int], reason: str, *, busy: bool = False) -> None:
        """Hand the unfinished batches back; note the failure (`busy`: a full server's
        refusal); back off before the next."""
        f = self.fetcher
        if not unfinished:  # every batch arrived: the next call will tell if the server is gone
            log.info("stream %s ended with %s after its last batch", self.name, reason)
            return
        batches = [f.order[p] for p in unfinished]
        f.stats.failed(self.server.target, f.schedule.requeue(self, unfinished))
        f.discovery_wanted()
        if _ROUTINE in reason.lower():
            log.info("stream %s: its connection was closed (%s); batch(es) %s handed back",
                     self.name, reason, batches)
            return
        self.failures += 1
        if self.server.failed(reason, busy=busy):
            log.warning("stream %s failed (%s); batch(es) %s handed back for other streams; "
                        "augsvc server %s is retried with back-off", self.name, reason,
                        batches, self.server.target)
        else:
            log.info("stream %s failed (%s); batch(es) %s handed back", self.name, reason,
                     batches)

    def cancel(self) -> None:
        with self._lock:
            if self.call is not None:
                self.call.cancel()
