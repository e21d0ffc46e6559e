"""What a pass fetches and in which order: positions, the reorder buffer, the read-ahead bound.

`PassOrder` maps a pass's positions (the order the consumer wants them) to
`(epoch, batch)` pairs, possibly across several epochs. `Schedule` hands positions out
lazily (those handed back after a failure first, then fresh ones, never past
`next to yield + readahead`), keeps finished batches until the consumer takes them,
and carries the iteration's error.
"""

from __future__ import annotations

import heapq
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from augsvc.client.errors import AugsvcError

__all__ = ["WATCH_INTERVAL_S", "PassOrder", "Schedule"]

WATCH_INTERVAL_S = 0.2


class Schedule:
    """Positions to fetch, reorder buffer and read-ahead limit, under one condition."""

    def __init__(self, count: int, readahead: int) -> None:
        self.count, self.readahead = count, readahead
        self.cond = threading.Condition()
        self.fresh = 0  # positions below this were handed out (at least once)
        self.retry: list[int] = []  # a heap of positions handed back
        self.done: dict[int, Any] = {}
        self.next = 0  # the position the consumer waits for
        self.error: BaseException | None = None
        self.closed = False
        self.live_streams = 0
        self.last_progress = time.monotonic()

    def take(self, n: int, alive: Callable[[], bool],
             together: Callable[[int, int], bool]) -> list[int] | None:
        """Up to n lowest positions to fetch below the read-ahead limit, each one
        `together(first, p)` with the first; None: stop."""
        with self.cond:
            while True:
                if self.closed or self.error is not None or not alive():
                    return None
                if self.next >= self.count:
                    return None
                limit = min(self.next + self.readahead, self.count)
                group: list[int] = []
                while len(group) < n:
                    retry = bool(self.retry) and self.retry[0] < limit
                    if not retry and self.fresh >= limit:
                        break
                    p = self.retry[0] if retry else self.fresh
                    if group and not together(group[0], p):
                        break
                    if retry:
                        heapq.heappop(self.retry)
                    else:
                        self.fresh += 1
                    group.append(p)
                if group:
                    return group
                self.cond.wait(WATCH_INTERVAL_S)

    def complete(self, position: int, item: Any) -> None:
        with self.cond:
            if position >= self.next and position not in self.done:
                self.done[position] = item
            self.last_progress = time.monotonic()
            self.cond.notify_all()

    def requeue(self, positions: Sequence[int]) -> None:
        with self.cond:
            for p in positions:
                heapq.heappush(self.retry, p)
            self.last_progress = time.monotonic()
            self.cond.notify_all()

    def touch(self) -> None:
        self.last_progress = time.monotonic()  # a plain store: no lock needed

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def stream_started(self) -> None:
        with self.cond:
            self.live_streams += 1

    def stream_exited(self, no_server_left: Callable[[], AugsvcError]) -> None:
        with self.cond:
            self.live_streams -= 1
            if (self.live_streams == 0 and not self.closed and self.error is None
                    and self.next < self.count):
                self.error = no_server_left()
            self.cond.notify_all()

    def ready(self, position: int) -> bool:
        """Whether the item at `position` has arrived (`get` would not wait for it)."""
        with self.cond:
            return position in self.done

    def get(self, position: int, watch: Callable[[float], None]) -> Any:
        """The item at `position` (the consumer's next); raises the iteration's error.

        `watch(stalled_s)` runs every WATCH_INTERVAL_S while waiting; `stalled_s` is the
        time since anything happened (a frame, a requeue) or the wait began.
        """
        with self.cond:
            since = time.monotonic()
            while position not in self.done:
                if self.error is not None:
                    raise self.error
                self.cond.wait(WATCH_INTERVAL_S)
                watch(time.monotonic() - max(since, self.last_progress))
            self.next = position + 1
            self.cond.notify_all()
            return self.done.pop(position)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.done.clear()
            self.cond.notify_all()


class PassOrder(Sequence[tuple[int, int]]):
    """The `(epoch, batch)` pairs of a pass, computed on demand: `epochs` epochs (None:
    without end) of `batches` batches each from epoch `epoch`, the first starting at
    batch `start`, the others at 0."""

    def __init__(self, epoch: int, batches: int, start: int = 0, epochs: int | None = 1
                 ) -> None:
        if not 0 <= start <= batches:
            raise ValueError(f"start {start} is outside an epoch of {batches} batches")
        self.epoch, self.batches, self.start = epoch, batches, start
        if batches == 0 or epochs == 0:
            self._len = 0
        elif epochs is None:
            self._len = sys.maxsize
        else:
            self._len = epochs * batches - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, position: int) -> tuple[int, int]:  # type: ignore[override]
        if not 0 <= position < self._len:
            raise IndexError(position)
        epochs, batch = divmod(self.start + position, self.batches)
        return self.epoch + epochs, batch
