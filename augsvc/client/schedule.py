"""What a pass fetches and in which order: positions, the reorder buffer, the read-ahead bound.

`PassOrder` maps a pass's positions (the order the consumer wants them) to
`(epoch, batch)` pairs, possibly across several epochs. `Schedule` hands positions out
lazily (those handed back after a failure first, then fresh ones, never past
`next to yield + readahead`), keeps finished batches until the consumer takes them,
and carries the iteration's error.

Every position handed out is held by one owner (a stream) until it completes or is
handed back. `abandon(owner)` hands back everything an owner holds and makes its
later calls no-ops: a stream stuck inside gRPC can be replaced without waiting for
it, and whatever it does when (if) it wakes up changes nothing.
"""

from __future__ import annotations

import heapq
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from augsvc.client.errors import AugsvcError

__all__ = ["WATCH_INTERVAL_S", "PassOrder", "Schedule"]

WATCH_INTERVAL_S = 0.2


class Schedule:
    """Positions to fetch, who holds them, the reorder buffer and the read-ahead limit."""

    def __init__(self, count: int, readahead: int) -> None:
        self.count, self.readahead = count, readahead
        self.cond = threading.Condition()
        self.fresh = 0  # positions below this were handed out (at least once)
        self.retry: list[int] = []  # a heap of positions handed back
        self.held: dict[Hashable, set[int]] = {}  # owner -> positions it fetches
        self.abandoned: set[Hashable] = set()
        self.done: dict[int, Any] = {}
        self.next = 0  # the position the consumer waits for
        self.error: BaseException | None = None
        self.closed = False

    @property
    def finished(self) -> bool:
        """The pass is over: every position yielded, closed, or failed."""
        return self.closed or self.error is not None or self.next >= self.count

    def take(self, owner: Hashable, n: int, alive: Callable[[], bool],
             together: Callable[[int, int], bool]) -> list[int] | None:
        """Up to n lowest positions for `owner` to fetch below the read-ahead limit, each
        one `together(first, p)` with the first; None: stop (the pass is over, `alive()`
        is False or the owner was abandoned)."""
        with self.cond:
            while True:
                if self.finished or owner in self.abandoned or not alive():
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
                    self.held.setdefault(owner, set()).update(group)
                    return group
                self.cond.wait(WATCH_INTERVAL_S)

    def complete(self, owner: Hashable, position: int, item: Any) -> bool:
        """Store a finished batch; False (ignored) if `owner` no longer holds `position`."""
        with self.cond:
            held = self.held.get(owner)
            if held is None or position not in held:
                return False
            held.discard(position)
            if position >= self.next:
                self.done[position] = item
            self.cond.notify_all()
            return True

    def requeue(self, owner: Hashable, positions: Sequence[int]) -> int:
        """Hand back those of `positions` the owner holds; how many that was."""
        with self.cond:
            held = self.held.get(owner, set())
            back = [p for p in positions if p in held]
            for p in back:
                held.discard(p)
                heapq.heappush(self.retry, p)
            self.cond.notify_all()
            return len(back)

    def abandon(self, owner: Hashable) -> int:
        """Hand back everything `owner` holds and ignore it from now on; how many."""
        with self.cond:
            held = self.held.pop(owner, set())
            self.abandoned.add(owner)
            for p in held:
                heapq.heappush(self.retry, p)
            self.cond.notify_all()
            return len(held)

    def set_readahead(self, readahead: int) -> None:
        with self.cond:
            self.readahead = readahead
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def ready(self, position: int) -> bool:
        """Whether the item at `position` has arrived (`get` would not wait for it)."""
        with self.cond:
            return position in self.done

    def get(self, position: int) -> Any:
        """The item at `position` (the consumer's next), waiting for it; raises the
        iteration's error (once the finished batches before it are out)."""
        with self.cond:
            while position not in self.done:
                if self.error is not None:
                    raise self.error
                if self.closed:
                    raise AugsvcError("the loader was closed during the pass")
                self.cond.wait(WATCH_INTERVAL_S)
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
