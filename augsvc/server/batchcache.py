"""A bounded LRU of encoded batches (the wire frames), shared by a worker's streams.

Batches are deterministic, so a batch asked for again — a trainer re-requesting after a
failover, several jobs with the same seed, `augsvc bench` measuring the wire — can be
sent from memory instead of being augmented again. Off (0 bytes) by default.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["BatchCache"]


class BatchCache:
    """Frames of whole batches keyed by everything that determines their bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[bytes, ...]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> tuple[bytes, ...] | None:
        """The frames stored under `key` (now most recently used), or None."""
        if self.max_bytes <= 0:
            return None
        with self._lock:
            frames = self._items.get(key)
            if frames is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return frames

    def put(self, key: Hashable, frames: tuple[bytes, ...]) -> None:
        """Store a batch's frames, evicting the least recently used beyond the bound."""
        size = sum(len(f) for f in frames)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= sum(len(f) for f in old)
            self._items[key] = frames
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= sum(len(f) for f in evicted)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes
