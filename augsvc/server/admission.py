"""Admission of StreamBatches calls: --max-streams, checked before a call waits for a thread.

grpcio's synchronous server runs interceptors on its polling thread, before a call is
queued for an executor thread, so `AdmissionInterceptor` refuses a stream over the limit
there: the refusal (RESOURCE_EXHAUSTED, or UNAVAILABLE while shutting down) then runs
on one of the spare threads, which admitted streams can never take (the executor has
`max_streams` + spare threads), and never queues behind running streams. A flood of
new streams is refused at once and the worker's threads stay bounded.

grpc's own `maximum_concurrent_rpcs` refuses without any thread, but it counts every
call, health checks included (grpcio 1.85 `_server.py`), so probes would fail during a
flood; it is not used.

`Admission.enter`, called by the handler, is the exact count (the interceptor's count of
calls on their way to a thread expires after `PENDING_TTL` s, for calls cancelled
before their handler started). A call whose request does not parse never reaches its
handler: the deserializer the interceptor hands on gives its pending place back at once
(`augsvc.server.decoding` decodes in the handler with it), so garbage cannot hold slots.
Put the interceptor after the token's, so calls without the token never take one.

Both refusals are ones that waiting fixes, so they carry trailing metadata
`augsvc-retry` (`wire.RETRY_KEY`): "busy" with RESOURCE_EXHAUSTED, "draining" with
UNAVAILABLE. `AugmentLoader` retries a call refused so (back-off, and its batches go to
other streams and servers); the other RESOURCE_EXHAUSTED, a batch over
--max-batch-size, has no such key and stays fatal to it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from augsvc import wire
from augsvc.server.metrics import ServerMetrics

__all__ = ["PENDING_TTL", "Admission", "AdmissionInterceptor", "Refused"]

PENDING_TTL = 10.0  # seconds an admitted call may take to reach its handler


class Refused(Exception):
    """A stream not admitted, with the status to answer and why a retry will do
    (`retry`: the value of `wire.RETRY_KEY`)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry: str) -> None:
        super().__init__(details)
        self.code, self.details, self.retry = code, details, retry

    def abort(self, context: grpc.ServicerContext) -> None:
        """End the call with this refusal (raises, as `context.abort` does)."""
        context.set_trailing_metadata(((wire.RETRY_KEY, self.retry),))
        context.abort(self.code, self.details)


class Admission:
    """Counts running streams against `max_streams`; refuses everything while draining.
    `metrics` gets the running streams and every refusal."""

    def __init__(self, max_streams: int, metrics: ServerMetrics | None = None) -> None:
        self.max_streams = max_streams
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.cond = threading.Condition()
        self.active = 0
        self.refusing = False
        self.refused = 0  # streams refused over the limit so far
        self._pending: collections.deque[float] = collections.deque()  # admit times

    def _refusal(self) -> Refused | None:
        if self.refusing:
            self.metrics.refusal("draining")
            return Refused(grpc.StatusCode.UNAVAILABLE,
                           "the server is shutting down; retry on another server",
                           wire.RETRY_DRAINING)
        if self.active + len(self._pending) >= self.max_streams:
            self.refused += 1
            self.metrics.refusal("max_streams")
            return Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"too many concurrent streams: this server process runs at most "
                           f"{self.max_streams}; retry later, use another server, or raise "
                           f"its --max-streams", wire.RETRY_BUSY)
        return None

    def admit(self) -> Refused | None:
        """On grpc's polling thread: None (the call may go on to its handler) or why not."""
        now = time.monotonic()
        with self.cond:
            while self._pending and now - self._pending[0] > PENDING_TTL:
                self._pending.popleft()
            refusal = self._refusal()
            if refusal is None:
                self._pending.append(now)
            return refusal

    def enter(self) -> Callable[[], None]:
        """In the handler: take a slot (or raise `Refused`); a once-only release function."""
        with self.cond:
            if self._pending:
                self._pending.popleft()
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            self.active += 1
            self.metrics.active.set(self.active)
        released = threading.Lock()

        def release() -> None:
            if released.acquire(blocking=False):
                with self.cond:
                    self.active -= 1
                    self.metrics.active.set(self.active)
                    self.cond.notify_all()

        return release

    def abandon(self) -> None:
        """An admitted call ended before its handler started (its request did not parse)."""
        with self.cond:
            if self._pending:
                self._pending.popleft()

    def refuse_new(self) -> None:
        with self.cond:
            self.refusing = True

    def wait_idle(self, timeout: float, force: threading.Event) -> int:
        """Wait up to `timeout` s (or until `force` is set) for no running stream; how many
        still run."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.active and not force.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.2))
            return self.active


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Refuses StreamBatches calls over the limit before they are queued for a thread."""

    def __init__(self, admission: Admission, method: str) -> None:
        self._admission, self._method = admission, method
        self._handlers: dict[tuple[grpc.StatusCode, str, str], grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method != self._method:
            return continuation(handler_call_details)
        refusal = self._admission.admit()
        if refusal is None:
            return self._releasing(continuation(handler_call_details))
        key = (refusal.code, refusal.details, refusal.retry)
        handler = self._handlers.get(key)  # the polling thread alone reads and writes it
        if handler is None:
            def refuse(request: bytes, context: grpc.ServicerContext) -> None:
                refusal.abort(context)

            handler = self._handlers[key] = grpc.unary_stream_rpc_method_handler(refuse)
        return handler  # the request stays raw bytes: nothing to parse

    def _releasing(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        """The admitted call's handler, whose deserializer gives the pending place back
        when the request does not parse."""
        if handler is None or handler.request_deserializer is None:
            return handler
        decode, admission = handler.request_deserializer, self._admission

        def deserialize(raw: bytes) -> Any:
            try:
                return decode(raw)
            except Exception:
                admission.abandon()
                raise

        return grpc.unary_stream_rpc_method_handler(  # StreamBatches: unary request, stream
            handler.unary_stream, request_deserializer=deserialize,
            response_serializer=handler.response_serializer)
