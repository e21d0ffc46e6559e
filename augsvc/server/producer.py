"""What a stream asks its worker's pipelines for: the validated `Job`, and `StreamWork`,
the queue between the scheduler that makes the stream's batches and the handler that
sends them.

A stream has at most `depth` batches made ahead of the handler (being made, or done and
waiting); each counts against the worker's `MemoryBudget` from the moment it is started
until the handler has handed its last frame to gRPC.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from augsvc.core.sampling import EpochPlan
from augsvc.core.stats import DatasetStats
from augsvc.server.catalog import DatasetEntry
from augsvc.server.memory import MemoryBudget
from augsvc.wire.convert import StreamRequest

if TYPE_CHECKING:
    from augsvc.server.scheduler import Scheduler

__all__ = ["Job", "StreamWork"]

HEADER_BYTES_PER_SAMPLE = 64  # generous: a BatchHeader holds ~3 varints per sample


@dataclass(frozen=True)
class Job:
    """A validated StreamBatches call."""

    request: StreamRequest
    entry: DatasetEntry
    stats: DatasetStats
    plan: EpochPlan
    batches: tuple[int, ...]
    chunk_bytes: int

    def cache_key(self, k: int) -> tuple:
        """Everything that determines batch k's frames."""
        r = self.request
        return (self.entry.name, r.spec, r.seed, r.epoch, r.rank, r.world_size, r.batch_size,
                r.tail, r.balance, self.chunk_bytes, k)

    def batch_bytes(self) -> int:
        """An upper bound of one batch's frames, in bytes."""
        spec, n = self.request.spec, self.request.batch_size
        h, w = spec.size
        return n * (h * w * 3 * np.dtype(spec.dtype).itemsize + HEADER_BYTES_PER_SAMPLE) + 4096


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
        self.ready: deque[tuple[int, tuple[bytes, ...], int]] = deque()  # (k, frames, bytes)
        self.ahead = 0  # batches started or ready, not yet taken by the handler
        self.held = 0  # budget bytes of the ready batches and the one being sent
        self.closed = False
        self.failure: BaseException | None = None
        self.scheduler: Scheduler | None = None
        self._cond = threading.Condition(lock)
        self._budget = budget

    # --- the handler's side

    def take(self) -> tuple[int, tuple[bytes, ...], int] | None:
        """The next batch's (k, frames, bytes), waiting for it; None once closed;
        re-raises the error that stopped the pipeline."""
        with self._cond:
            while not self.ready:
                if self.failure is not None:
                    raise self.failure
                if self.closed:
                    return None
                self._cond.wait()
            item = self.ready.popleft()
            self.ahead -= 1
            self._wake_schedulers()
            return item

    def sent(self, nbytes: int) -> None:
        """The handler has handed a taken batch to gRPC: its memory leaves the budget."""
        with self._cond:
            if not self.closed:
                self.held -= nbytes
                self._budget.give(nbytes)
                self._wake_schedulers()

    def close(self) -> None:
        """The stream ended (done, failed or cancelled): give its memory back, stop its work.
        Idempotent; safe from any thread (gRPC's termination callback)."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._budget.give(self.held)
            self.held = 0
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

    def _deliver(self, k: int, frames: tuple[bytes, ...], reserved: int) -> None:
        """A started batch is done: into `ready`, its reservation corrected to its size."""
        if self.closed:
            self._budget.give(reserved)
            return
        size = sum(len(f) for f in frames)
        self._budget.take(size - reserved)
        self.held += size
        self.ready.append((k, frames, size))
        self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self._cond.notify_all()
