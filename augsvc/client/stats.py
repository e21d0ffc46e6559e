"""`loader.stats()`: how long the trainer waited for data, and what each server delivered.

`StatsRecorder` is the loader's running tally (thread-safe: the stream threads and the
consumer update it); `LoaderStats` / `ServerStats` are the immutable snapshots that
`AugmentLoader.stats()` returns. Counters are cumulative over the loader's lifetime
(every pass), like Prometheus counters (`augsvc.client.metrics` exports them).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LoaderStats", "ServerStats", "StatsRecorder"]


@dataclass(frozen=True)
class ServerStats:
    """What one server address delivered to this loader.

    `seconds`: wall time during which at least one call to it was running;
    `images_per_s` = images / seconds. `failures`: its calls that failed with a
    retryable status (or were abandoned); `reconnects`: times it answered again
    after failing. `workers`: how many of this loader's streams each of the server's
    worker processes served when last reported (by worker index; () from a server that
    does not say); `redials`: connections replaced to even them out
    (`augsvc.client.placement`).
    """

    batches: int = 0
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    reconnects: int = 0
    workers: tuple[int, ...] = ()
    redials: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LoaderStats:
    """A snapshot of `AugmentLoader.stats()`.

    * `wait_s`: time the training loop spent blocked in `next()` waiting for a batch
      (data starvation; 0 when augsvc keeps ahead of the trainer).
    * `batches`: batches yielded to the training loop.
    * `retries`: calls that failed with a retryable status, or were abandoned (stuck
      or silent past `timeout`), and were retried.
    * `failovers`: batches handed back by a failed call to be fetched again (by any
      stream of any server: the same bytes).
    * `abandoned`: streams given up for a call that gRPC never ended, or silence.
    * `reconnects`: times a failing server answered again.
    * `servers`: per address (`ServerStats`), including replicas that have left.
    """

    wait_s: float = 0.0
    batches: int = 0
    retries: int = 0
    failovers: int = 0
    abandoned: int = 0
    reconnects: int = 0
    servers: dict[str, ServerStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain types (for logs and JSON); each server's images_per_s included."""
        out = asdict(self)
        for address, server in self.servers.items():
            out["servers"][address]["images_per_s"] = server.images_per_s
        return out


class _ServerTally:
    def __init__(self) -> None:
        self.batches = self.images = self.bytes = self.failures = self.reconnects = 0
        self.redials = 0
        self.workers: tuple[int, ...] = ()
        self.seconds = 0.0
        self.active = 0  # calls in flight
        self.busy_since = 0.0


class StatsRecorder:
    """The running counters behind `LoaderStats` (one per loader, across passes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wait_s = 0.0
        self.batches = self.retries = self.failovers = self.abandoned = self.reconnects = 0
        self._servers: dict[str, _ServerTally] = {}

    def __getstate__(self) -> dict[str, Any]:  # a loader is pickled into DataLoader workers
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _server(self, address: str) -> _ServerTally:
        tally = self._servers.get(address)
        if tally is None:
            tally = self._servers[address] = _ServerTally()
        return tally

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.wait_s += seconds

    def yielded(self) -> None:
        with self._lock:
            self.batches += 1

    def call_started(self, address: str) -> None:
        with self._lock:
            tally = self._server(address)
            if tally.active == 0:
                tally.busy_since = time.monotonic()
            tally.active += 1

    def call_ended(self, address: str) -> None:
        with self._lock:
            tally = self._server(address)
            tally.active -= 1
            if tally.active == 0:
                tally.seconds += time.monotonic() - tally.busy_since

    def received(self, address: str, images: int, nbytes: int) -> None:
        with self._lock:
            tally = self._server(address)
            tally.batches += 1
            tally.images += images
            tally.bytes += nbytes

    def failed(self, address: str, handed_back: int, *, abandoned: bool = False) -> None:
        """A call failed (or was abandoned) and `handed_back` batches go back to the queue."""
        with self._lock:
            self._server(address).failures += 1
            self.retries += 1
            self.failovers += handed_back
            self.abandoned += abandoned

    def reconnected(self, address: str) -> None:
        with self._lock:
            self._server(address).reconnects += 1
            self.reconnects += 1

    def placed(self, address: str, workers: tuple[int, ...]) -> None:
        """This loader's streams per worker of `address`, as now known."""
        with self._lock:
            self._server(address).workers = workers

    def redialed(self, address: str) -> None:
        with self._lock:
            self._server(address).redials += 1

    def snapshot(self) -> LoaderStats:
        now = time.monotonic()
        with self._lock:
            servers = {
                address: ServerStats(
                    batches=t.batches, images=t.images, bytes=t.bytes, failures=t.failures,
                    reconnects=t.reconnects, workers=t.workers, redials=t.redials,
                    seconds=t.seconds + (now - t.busy_since if t.active else 0.0))
                for address, t in self._servers.items()
            }
            return LoaderStats(wait_s=self.wait_s, batches=self.batches, retries=self.retries,
                               failovers=self.failovers, abandoned=self.abandoned,
                               reconnects=self.reconnects, servers=servers)
