"""The bearer-token check on `augsvc.v1.Augment` calls (health and reflection stay open)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

import grpc

from augsvc import wire
from augsvc.server.logs import request_log

__all__ = ["TokenInterceptor"]

class TokenInterceptor(grpc.ServerInterceptor):
    """`augsvc.v1.Augment` calls need metadata `authorization: Bearer <token>`, the token
    one of what `tokens()` gives at the call (UNAUTHENTICATED otherwise); other services
    (health, reflection) stay open."""

    def __init__(self, tokens: Callable[[], Collection[bytes]]) -> None:
        self._tokens = tokens
        self._prefix = f"/{wire.SERVICE_NAME}/"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not details.method.startswith(self._prefix):
            return continuation(details)
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if not values:
            return _deny(details.method, "missing credentials: send metadata "
                         "'authorization: Bearer <token>' with the server's token")
        scheme, _, given = str(values[0]).partition(" ")
        offered = given.strip().encode()
        # a list, not a generator: every token is compared, so the time taken says
        # nothing of which one came close
        if scheme.lower() == "bearer" and any(
                [hmac.compare_digest(offered, token) for token in self._tokens()]):
            return continuation(details)
        return _deny(details.method, "invalid credentials: the bearer token in "
                     "'authorization' metadata does not match the server's token")


def _deny(method: str, message: str) -> grpc.RpcMethodHandler:
    def abort(request: bytes, context: grpc.ServicerContext) -> None:
        request_log.info("unauthenticated call to %s from %s", method, context.peer(),
                         extra={"limit_key": "UNAUTHENTICATED", "peer": context.peer()})
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if method == wire.STREAM_BATCHES_METHOD:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
