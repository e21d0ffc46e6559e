"""The worker's watchdog: cancels streams whose client stopped reading, gives memory back.

A stream's handler marks the moment it hands a frame to gRPC (`Watched.blocked_since`)
and clears it when gRPC asks for the next one, which it does once the frame is sent:
flow control holds a frame while the client reads nothing. A frame held for longer than
`--stall-timeout` seconds cancels the call with DEADLINE_EXCEEDED (clients retry it:
the loader hands the batches to another stream); its batches leave the memory budget
at once. Waiting for a batch to be made is not a stall.

When the last running stream has ended, the freed memory goes back to the system
(`release_free_memory`): without it glibc keeps gigabytes of freed frames. Streams
refused over --max-streams are logged as one count every `REFUSALS_EVERY` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from augsvc.server.memory import release_free_memory

__all__ = ["Watchdog", "Watched", "cancel_call"]

log = logging.getLogger("augsvc.server")

REFUSALS_EVERY = 10.0  # seconds between log lines counting refused streams


def cancel_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread with this status (plain CANCELLED where grpcio's
    call object lacks a status-taking cancel)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # grpcio's cygrpc Call: grpc_call_cancel_with_status
    except (AttributeError, TypeError):
        context.cancel()


class Watched:
    """One stream's send clock (module doc)."""

    __slots__ = ("blocked_since", "context", "stalled")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.blocked_since: float | None = None
        self.stalled = False  # cancelled by the watchdog


class Watchdog:
    """Checks every watched stream each `tick` seconds; `idle()` says no stream runs,
    `refused()` how many have been refused over the limit so far."""

    def __init__(self, stall_timeout: float, idle: Callable[[], bool],
                 refused: Callable[[], int]) -> None:
        self.stall_timeout, self._idle, self._refused = stall_timeout, idle, refused
        self._logged = (0, time.monotonic())  # refusals counted at the last log line
        self.tick = min(1.0, stall_timeout / 4) if stall_timeout > 0 else 1.0
        self._watched: set[Watched] = set()
        self._lock = threading.Lock()
        self._release_due = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="augsvc-watchdog", daemon=True)
        self.stalls = 0  # streams cancelled so far

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def watch(self, context: grpc.ServicerContext) -> Watched:
        watched = Watched(context)
        with self._lock:
            self._watched.add(watched)
        return watched

    def unwatch(self, watched: Watched) -> None:
        with self._lock:
            self._watched.discard(watched)
            self._release_due = True

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.check(time.monotonic())
            except Exception:  # never let the watchdog die
                log.exception("watchdog check failed")

    def check(self, now: float) -> None:
        """Cancel the stalled streams; give memory back if every stream has ended."""
        with self._lock:
            watched = list(self._watched)
        limit = self.stall_timeout
        for w in watched:
            since = w.blocked_since
            if limit > 0 and since is not None and now - since > limit and not w.stalled:
                w.stalled = True
                self.stalls += 1
                log.warning("stream from %s cancelled: the client read nothing for %g s "
                            "(--stall-timeout)", w.context.peer(), limit)
                cancel_call(w.context, grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the client read nothing for {limit:g} s (server "
                            f"--stall-timeout); request the unsent batches again")
        with self._lock:
            due = self._release_due and not self._watched
        if due and self._idle():
            with self._lock:
                self._release_due = False
            release_free_memory()
        refused, (logged, since) = self._refused(), self._logged
        if refused > logged and now - since >= REFUSALS_EVERY:
            log.info("refused %d stream(s) over --max-streams in the last %.0f s",
                     refused - logged, now - since)
            self._logged = (refused, now)
