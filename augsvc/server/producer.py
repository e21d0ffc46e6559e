"""What a stream asks its worker's pipelines for: the validated `Job`, and `StreamWork`,
the queue between the scheduler that makes the stream's batches and the handler that
sends them.

A stream has at most `depth` batches made ahead of the handler (being made, or done and
waiting); each is charged to the worker's `MemoryBudget` from the moment it is started
until the handler has handed its last frame to gRPC, and waits while the budget is full.
One exception keeps clients that read from waiting for memory that clients that do not
read have filled: a stream whose client has read a batch of it and everything sent
since (its handler waits, nothing on the way) gets its next batch at once, past the
limit if need be; that batch goes out as soon as it is made. Waiting for memory is not
a stall (`augsvc.server.watchdog`): the streams holding memory unread are cancelled by
--stall-timeout, and with it off a client that opens streams it does not read can make
its own other streams wait for good.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from augsvc.core.sampling import EpochPlan
from augsvc.core.stats import DatasetStats
from augsvc.server.catalog import DatasetEntry
from augsvc.server.memory import Charge, MemoryBudget
from augsvc.wire.convert import StreamRequest

if TYPE_CHECKING:
    from augsvc.server.scheduler import Scheduler

__all__ = ["Job", "Made", "StreamWork"]

HEADER_BYTES_PER_SAMPLE = 64  # generous: a BatchHeader holds ~3 varints per sample


@dataclass(frozen=True)
class Job:
    """A validated StreamBatches call."""

    request: StreamRequest
    entry: DatasetEntry
    stats: DatasetStats
    stats_source: str  # which statistics `stats` are: "dataset" or "imagenet"
    plan: EpochPlan
    batches: tuple[int, ...]
    chunk_bytes: int

    def cache_key(self, k: int) -> tuple:
        """Everything that determines batch k's frames."""
        return (self.request.batch_key(), self.chunk_bytes, k)

    def batch_bytes(self) -> int:
        """An upper bound of one batch's frames, in bytes."""
        spec, n = self.request.spec, self.request.batch_size
        h, w = spec.size
        return n * (h * w * 3 * np.dtype(spec.dtype).itemsize + HEADER_BYTES_PER_SAMPLE) + 4096


class Made(NamedTuple):
    """A batch made for a stream: its index, frames, memory charge, and when it was done
    (`time.monotonic()`)."""

    k: int
    frames: tuple[bytes, ...]
    charge: Charge
    at: float


class StreamWork:
    """One stream's batches between the scheduler (`todo` -> `ready`) and its handler;
    `client` names who asked (the peer: one connection), for the scheduler's fairness.

    Every method that changes state takes the worker's scheduling lock (`lock`, shared
    with the schedulers and the budget); the scheduler-side ones (`_` prefixed, called by
    `Scheduler`) expect the caller to hold it.
    """

    def __init__(self, job: Job, todo: list[int], *, client: str, depth: int,
                 lock: threading.Lock, budget: MemoryBudget) -> None:
        self.job, self.client, self.depth, self.estimate = job, client, depth, job.batch_bytes()
        self.todo = deque(todo)  # batches still to start, in the order they are sent
        self.ready: deque[Made] = deque()
        self.ahead = 0  # batches started or ready, not yet taken by the handler
        # since when it may start one more batch (`ahead` < `depth`; for the queue time)
        self.due_since: float | None = None
        self._held: set[Charge] = set()  # of the ready batches and the one being sent
        self.closed = False
        self.waiting = False  # the handler waits for a batch, none is ready or being made
        self.delivered = False  # the handler has sent at least one batch
        self.failure: BaseException | None = None
        self.scheduler: Scheduler | None = None
        self._cond = threading.Condition(lock)
        self._budget = budget

    # --- the handler's side

    def take(self) -> Made | None:
        """The next batch, waiting for it; None once closed; re-raises the error that
        stopped the pipeline."""
        with self._cond:
            while not self.ready:
                if self.failure is not None:
                    raise self.failure
                if self.closed:
                    return None
                if not self.waiting:
                    self.waiting = True
                    self._wake_schedulers()
                self._cond.wait()
            self.waiting = False
            item = self.ready.popleft()
            if self.ahead == self.depth:
                self.due_since = time.monotonic()
            self.ahead -= 1
            self._wake_schedulers()
            return item

    def sent(self, charge: Charge | None) -> None:
        """The handler has handed a batch to gRPC (a taken one: its memory leaves the
        budget; None: one from the batch cache)."""
        with self._cond:
            self.delivered = True
            if charge is not None and charge in self._held:
                self._held.discard(charge)
                self._budget.release(charge)
                self._wake_schedulers()

    def close(self) -> None:
        """The stream ended (done, failed or cancelled): give its memory back, stop its work.
        Idempotent; safe from any thread (gRPC's termination callback)."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            for charge in self._held:
                self._budget.release(charge)
            self._held.clear()
            self.ready.clear()
            self.todo.clear()
            if self.scheduler is not None:
                self.scheduler.detach(self)
            self._wake_schedulers()
            self._cond.notify_all()

    def _wake_schedulers(self) -> None:
        if self.scheduler is not None:
            self.scheduler.pool_wake()

    # --- the scheduler's side (lock held)

    def _urgent(self) -> bool:
        """Its client has read everything so far and waits for the next batch."""
        return self.waiting and self.delivered and not self.ahead

    def _deliver(self, k: int, frames: tuple[bytes, ...], charge: Charge) -> None:
        """A started batch is done: into `ready`, its charge corrected to its size."""
        if self.closed:
            self._budget.release(charge)
            return
        self._budget.resize(charge, sum(len(f) for f in frames))
        self._held.add(charge)
        self.ready.append(Made(k, frames, charge, time.monotonic()))
        self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._cond.notify_all()
