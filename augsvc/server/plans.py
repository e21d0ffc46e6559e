"""Epoch orders shared by the streams of a worker: built once per epoch, kept within a byte budget.

A request's plan (`augsvc.core.sampling.EpochPlan`) is its sharding of the epoch order
of (dataset, seed, epoch, balance, shuffle); only the order costs memory (O(dataset)),
so the cache holds orders, bounded in bytes, least recently used first out. Concurrent
requests for an order being built wait for that build instead of making their own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

from augsvc.core.sampling import EpochOrder

__all__ = ["MIN_PLAN_BYTES", "OrderCache", "plan_budget"]

MIN_PLAN_BYTES = 256 << 20  # epoch orders kept per worker: ~50 ImageNet orders (5 MB each)


def plan_budget(dataset_sizes: Iterable[int]) -> int:
    """The order cache's budget: MIN_PLAN_BYTES, or room for 4 orders of the largest dataset."""
    largest = max(dataset_sizes, default=0)
    return max(MIN_PLAN_BYTES, 4 * EpochOrder.nbytes_for(largest, largest, balance=False))


class _Build:
    """An order being built by one thread, awaited by the others."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.order: EpochOrder | None = None
        self.error: BaseException | None = None


class OrderCache:
    """Epoch orders by key, at most `max_bytes` of them (LRU)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._orders: OrderedDict[Hashable, EpochOrder] = OrderedDict()
        self._building: dict[Hashable, _Build] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the orders held now."""
        return self._bytes

    def get(self, key: Hashable, build: Callable[[], EpochOrder]) -> EpochOrder:
        """The order of `key`, built by `build()` if not held (an order over the whole
        budget is returned but not kept: callers refuse those before asking)."""
        with self._lock:
            order = self._orders.get(key)
            if order is not None:
                self._orders.move_to_end(key)
                return order
            pending = self._building.get(key)
            mine = pending is None
            if mine:
                pending = self._building[key] = _Build()
        if not mine:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.order
        try:
            pending.order = order = build()
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._building[key]
                if pending.order is not None:
                    self._insert(key, pending.order)
            pending.done.set()
        return order

    def _insert(self, key: Hashable, order: EpochOrder) -> None:
        """Hold `order`, evicting the least recently used until the budget holds (lock held)."""
        if order.nbytes > self.max_bytes:
            return
        self._orders[key] = order
        self._bytes += order.nbytes
        while self._bytes > self.max_bytes and self._orders:
            _, old = self._orders.popitem(last=False)
            self._bytes -= old.nbytes
