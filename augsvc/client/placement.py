"""`Placement`: which worker of one server each of a loader's streams landed on, and which
stream should re-dial to even them out.

`augsvc serve --workers N` runs N processes on one port; the kernel's `SO_REUSEPORT` hash
of each connection's addresses picks the process, so a loader's streams can all land on
one worker while another serves none of them. Each worker has the same CPU (or GPU) and
shares it fairly between the streams it serves, so a loader whose streams crowd one
worker gets less than its share. Every call's initial metadata names its worker
(`wire.WORKER_KEY`, "<index>/<count>"); the stream notes it (`landed`) once the call's
first frame is in, and after each call that delivered all its batches, before its next
one, asks `redial`. Nothing is decided before every slot has landed once.

The rule: the streams are even when the busiest worker has at most one stream more than
the idlest (of all `count` workers, those with none included; a stream that re-dialed
and has not landed yet counts as on the idlest). While they are not, the
highest-numbered stream on a worker with two or more streams above the idlest one
re-dials: a new connection, a new source port, a new hash. Each stream re-dials at most
REDIAL_LIMIT times in a row (the count starts again once the streams are even), so a
server whose reports cannot be evened out (an address in front of several replicas, a
worker count that changed) costs a few connections, never a loop. Streams whose worker is
not known yet, or that named another count, are left out; a server that sends no worker
metadata is left alone.
"""

from __future__ import annotations

import threading

__all__ = ["REDIAL_LIMIT", "Placement"]

REDIAL_LIMIT = 8  # re-dials in a row per stream slot before it stays where it is


class Placement:
    """The workers of one server that a pass's `slots` stream slots landed on
    (thread-safe)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._where: dict[int, tuple[int, int]] = {}  # slot -> (worker index, count)
        self._tries: dict[int, int] = {}  # slot -> re-dials in a row
        self._count = 0  # the worker count named last
        self._moving: set[int] = set()  # slots that re-dialed and have not landed yet

    def landed(self, slot: int, worker: tuple[int, int]) -> None:
        """`slot`'s current call is served by worker (index, count)."""
        with self._lock:
            self._where[slot] = worker
            self._count = worker[1]
            self._moving.discard(slot)

    def loads(self) -> tuple[int, ...]:
        """How many known slots each worker serves, by index (() before any is known;
        of the worker count named last)."""
        with self._lock:
            return self._loads(self._count)

    def _loads(self, count: int) -> tuple[int, ...]:
        loads = [0] * count
        for index, n in self._where.values():
            if n == count:
                loads[index] += 1
        return tuple(loads)

    def redial(self, slot: int) -> int:
        """0 if `slot` stays on its connection; else the attempt number (1..REDIAL_LIMIT)
        of the re-dial it must make now (its worker is then forgotten until the next
        `landed`)."""
        with self._lock:
            where = self._where.get(slot)
            if where is None or len(self._where) + len(self._moving) < self.slots:
                return 0  # not every slot has landed yet: too soon to tell
            index, count = where
            loads = list(self._loads(count))
            for _ in self._moving:  # counted where they should land: on the idlest
                loads[loads.index(min(loads))] += 1
            if max(loads) - min(loads) <= 1:
                if not self._moving:  # even for real: the next uneven split starts afresh
                    self._tries.clear()
                return 0
            if loads[index] < min(loads) + 2:
                return 0
            candidates = [s for s, w in self._where.items()
                          if w == where and self._tries.get(s, 0) < REDIAL_LIMIT]
            if slot != max(candidates, default=None):
                return 0
            self._tries[slot] = tries = self._tries.get(slot, 0) + 1
            del self._where[slot]
            self._moving.add(slot)
            return tries
