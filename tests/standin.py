"""A CPU stand-in for `augsvc.client.transfer.CudaTransfer`, for tests of the device path.

`HostTransfer` copies each batch, then prepares it, in order on one worker thread (the
"side stream"), `delay` seconds late, reading the staging buffer through the ring's
view, which does not hold the buffer's lease, as a DMA engine would: a buffer reused
before its copy ran shows up as wrong bytes.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["FutureFence", "HostInFlight", "HostTransfer"]


class FutureFence:
    """A fence that is a Future: done when the stand-in's copy has run."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def query(self) -> bool:
        return self.future.done()

    def synchronize(self) -> None:
        self.future.result()


class HostInFlight:
    def __init__(self, fence: FutureFence, done: Future) -> None:
        self.fence, self.done = fence, done

    def result(self) -> tuple[Any, Any]:
        return self.done.result()


class HostTransfer:
    """`CudaTransfer` on the CPU (see the module documentation)."""

    pin = False

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.side = ThreadPoolExecutor(1, thread_name_prefix="side-stream")
        self.starts = 0

    def start(self, images: Any, labels: Any, prepare: Any) -> HostInFlight:
        self.starts += 1

        def copy() -> Any:
            time.sleep(self.delay)
            return images.clone()  # `images` views the ring buffer without holding its lease

        copied = self.side.submit(copy)
        done = self.side.submit(lambda: (prepare(copied.result()), labels.clone()))
        return HostInFlight(FutureFence(copied), done)
