"""Server logging that a client cannot grow: rate-limited request lines, gRPC's own errors, JSON.

* `request_log`, the logger of per-request lines (logger `augsvc.server.requests`: refused
  streams at INFO, one line per finished stream at DEBUG), passes through a `RateLimit`:
  DEBUG lines pass (asking for them is asking for one per stream); of the others, the
  first `burst` lines of a kind, then at most one per `interval` seconds carrying the
  count of those left out. A line's kind is its `limit_key` extra (e.g. the status
  code), else its format string up to the first ":" (grpcio formats its messages before
  logging them: "Exception iterating responses: <the exception>"); at most `MAX_KINDS`
  kinds are told apart, the rest share one.
* `limit_grpc_logs()` puts the same limit on grpcio's Python loggers, which log a full
  traceback at ERROR for every exception a handler lets through (the first lines keep
  theirs) and for every message that cannot be (de)serialized (the traceback is reduced
  to the exception's line). Requests are decoded by `augsvc.server.decoding`, not by
  grpcio, so an undecodable request is one rate-limited INFO line in `request_log`.
* `configure(level, fmt)` is `augsvc serve`'s logging on stderr: "text" lines, or "json":
  one object per line with time, level, logger, pid, message and the record's extra
  fields.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

__all__ = ["FORMATS", "JsonFormatter", "RateLimit", "configure", "limit_grpc_logs", "request_log"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s augsvc[%(process)d] %(levelname)s %(name)s: %(message)s"
MAX_KINDS = 256
GRPC_LOGGERS = {"grpc._common": False, "grpc._server": True, "grpc._cython.cygrpc": True}
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "limit_key"}


class RateLimit(logging.Filter):
    """Per kind of line: the first `burst` pass, then one per `interval` s with a count.
    DEBUG lines always pass.

    Tracebacks are kept in the first `burst` lines if `tracebacks`, else reduced to the
    exception's one-line summary.
    """

    def __init__(self, burst: int = 10, interval: float = 60.0, *, tracebacks: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval, self.tracebacks = burst, interval, tracebacks
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, object], list] = {}  # [seen, left out, last passed]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:  # asked for with --log-level debug: every line
            return True
        key = (record.name, getattr(record, "limit_key", None)
               or str(record.msg).split(":", 1)[0][:200])
        now = self._clock()
        with self._lock:
            if key not in self._kinds and len(self._kinds) >= MAX_KINDS:
                key = (record.name, "")
            state = self._kinds.setdefault(key, [0, 0, -float("inf")])
            state[0] += 1
            seen, left_out, last = state
            if seen > self.burst and now - last < self.interval:
                state[1] += 1
                return False
            state[1], state[2] = 0, now
        if seen > self.burst or not self.tracebacks:
            _shorten_traceback(record)
        if seen == self.burst:
            _append(record, f"[{self.burst} lines like this logged; from now on at most one "
                    f"per {self.interval:g} s]")
        elif left_out:
            _append(record, f"[{left_out} more like this in the last {now - last:.0f} s, "
                    f"{seen} in all]")
        return True


request_log = logging.getLogger("augsvc.server.requests")
request_log.addFilter(RateLimit())


def limit_grpc_logs() -> None:
    """Rate-limit grpcio's per-request error lines (idempotent; module docstring)."""
    for name, tracebacks in GRPC_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(tracebacks=tracebacks))


def _shorten_traceback(record: logging.LogRecord) -> None:
    """Replace a record's traceback by the exception's one-line summary."""
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        _append(record, f"({type(exc).__name__}{': ' + text if text else ''})")
        record.exc_info = None
        record.exc_text = None


def _append(record: logging.LogRecord, note: str) -> None:
    record.msg = f"{record.getMessage()} {note}"
    record.args = None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, pid, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level` ("debug" ... "error") as "text" or "json" lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
