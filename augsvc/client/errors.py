"""`AugsvcError`, and which gRPC statuses a retry cannot fix.

A status in `FATAL_CODES` fails the pass at once, unless the server marked the refusal
as one that waiting fixes: trailing metadata `augsvc-retry` (`wire.RETRY_KEY`), which
augsvc servers set when they are full (RESOURCE_EXHAUSTED over --max-streams) or
draining (UNAVAILABLE). The same status without it, e.g. RESOURCE_EXHAUSTED for a batch
over --max-batch-size, is the request's own fault (`fatal`).
"""

from __future__ import annotations

from typing import Any

import grpc

from augsvc import wire

__all__ = ["FATAL_CODES", "AugsvcError", "fatal", "retry_hint", "status"]

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


def retry_hint(err: grpc.RpcError) -> str | None:
    """Why the server says a retry will do ("busy", "draining"), or None."""
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == wire.RETRY_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def fatal(err: grpc.RpcError) -> bool:
    """No retry can fix this failure (module docstring)."""
    code, _ = status(err)
    return code in FATAL_CODES and retry_hint(err) is None
