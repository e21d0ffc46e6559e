"""`AugsvcError`, and which gRPC statuses a retry cannot fix."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["FATAL_CODES", "AugsvcError", "status"]

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
        code, details = status(err)
        name = code.name if code is not None else "UNKNOWN"
        return cls(f"{what} on {server} failed: {name}: {details}",
                   code=code, details=details, server=server)


AugsvcError.__module__ = "augsvc"  # its public home: augsvc.AugsvcError


def _rebuild_error(message: str, code: Any, details: Any, server: Any) -> AugsvcError:
    return AugsvcError(message, code=code, details=details, server=server)


def status(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    return code, details or str(err)
