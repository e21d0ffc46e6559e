"""The worker's pipeline pool: idle `Augmenter`s kept for reuse by later streams."""

from __future__ import annotations

import logging
import threading
import time

from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.engine.augmenter import Augmenter
from augsvc.server.catalog import DatasetEntry

__all__ = ["PipelinePool", "PoolKey"]

log = logging.getLogger("augsvc.server")

PoolKey = tuple[str, AugmentSpec, str, int]


class PipelinePool:
    """Idle `Augmenter`s keyed by (dataset, spec, device, max batch size), reused by streams.

    `acquire` hands a pipeline to one stream exclusively (building one when none is
    idle); `release` returns it. At most `max_idle` idle pipelines are kept (least
    recently used dropped first). Max batch sizes are rounded up to a power of two
    (capped at the server's limit) so nearby batch sizes share pipelines.
    """

    def __init__(self, *, device: str, device_id: int, dali_threads: int, io_threads: int,
                 max_idle: int, max_batch_size: int = 1 << 30) -> None:
        self.device, self.device_id = device, device_id
        self.dali_threads, self.io_threads = dali_threads, io_threads
        self.max_idle, self.max_batch_size = max_idle, max_batch_size
        self._idle: list[tuple[PoolKey, Augmenter]] = []  # oldest first
        self._lock = threading.Lock()
        self._closed = False
        self.built = 0  # pipelines built so far (for tests and logs)

    def acquire(self, entry: DatasetEntry, spec: AugmentSpec, stats: DatasetStats,
                batch_size: int) -> tuple[PoolKey, Augmenter]:
        """An idle pipeline for these arguments, or a new one (~0.3 s to build)."""
        cap = min(1 << (batch_size - 1).bit_length(), max(batch_size, self.max_batch_size))
        key: PoolKey = (entry.name, spec, self.device, cap)
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i][0] == key:
                    return self._idle.pop(i)
        started = time.monotonic()
        augmenter = Augmenter(
            entry.index, spec, stats, max_batch_size=cap, device=self.device,
            num_threads=self.dali_threads, io_threads=self.io_threads,
            device_id=self.device_id if self.device == "gpu" else None,
        )
        with self._lock:
            self.built += 1
        log.debug("built a %s pipeline for %s (max batch %d) in %.2f s", self.device,
                  entry.name, cap, time.monotonic() - started)
        return key, augmenter

    def release(self, key: PoolKey, augmenter: Augmenter) -> None:
        """Give a pipeline back for reuse."""
        with self._lock:
            if self._closed:
                evicted = [augmenter]
            else:
                self._idle.append((key, augmenter))
                evicted = [a for _, a in self._idle[: max(0, len(self._idle) - self.max_idle)]]
                del self._idle[: len(evicted)]
        for a in evicted:
            a.close()

    def close(self) -> None:
        """Drop every idle pipeline; later releases close theirs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, a in idle:
            a.close()
