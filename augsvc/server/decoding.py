"""Request messages are decoded in the handler, not by grpcio; undecodable: INVALID_ARGUMENT.

grpcio 1.85 keeps ~16 KB of server memory for every request message its deserializer
rejects, never freed, and after one such message on a client-streaming call (server
reflection) `server.stop()` never completes (plain reproductions: docs/hardening.md).
`DecodeInHandler`, a server interceptor placed first, hands grpcio every method handler
(augsvc's, health's, reflection's) without a request deserializer and decodes in the
handler instead: a message that does not parse ends the call with INVALID_ARGUMENT
("<method>: the request is not a valid message (N bytes)"), which frees everything,
and one rate-limited line in `augsvc.server.requests`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from augsvc.server.logs import request_log

__all__ = ["DecodeInHandler"]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class DecodeInHandler(grpc.ServerInterceptor):
    """Every handler decodes its own requests (module docstring); put it first."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _decoding(handler, details.method)


def _decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, taking raw bytes and decoding them itself."""
    kind = (handler.request_streaming, handler.response_streaming)
    behavior = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]
    decode = handler.request_deserializer

    def parse(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return decode(raw)
        except Exception as exc:  # a protobuf DecodeError, or whatever a deserializer raises
            request_log.info("undecodable request to %s from %s (%d bytes): %s", method,
                             context.peer(), len(raw), type(exc).__name__,
                             extra={"limit_key": "undecodable", "peer": context.peer()})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method}: the request is not a valid message ({len(raw)} bytes)")

    if handler.request_streaming:
        def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            return behavior((parse(raw, context) for raw in requests), context)
    else:
        def run(raw: bytes, context: grpc.ServicerContext) -> Any:
            return behavior(parse(raw, context), context)

    return _FACTORIES[kind](run, request_deserializer=None,
                            response_serializer=handler.response_serializer)
