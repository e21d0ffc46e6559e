"""Batches onto a CUDA device: one copy per batch on a side stream, the next one's issued early.

`device_batches` is the delivery of a `device="cuda"` pass. Each batch arrives in a
`StagingRing` buffer (pinned); the consumer's thread then

1. issues its host-to-device copy with `Transfer.start`: `CudaTransfer` copies on the
   loader's own CUDA stream (non-blocking), records an event once the copy is done (the
   ring's fence: the buffer may be reused after it), then runs `prepare` there too
   (normalization, fused into one kernel) and records a second event;
2. before yielding batch k, issues batch k+1's copy if k+1 has arrived (else when the
   consumer asks for it), so that it runs during the training step on batch k;
3. hands batch k over with `InFlight.result`: the consumer's current stream waits for
   the second event (no host wait) and `record_stream` tells the caching allocator that
   the consumer's stream uses the tensors, so their memory is not given to the side
   stream's next batch while the training step may still read them.

`Transfer` and `InFlight` are the small interface behind which tests put a CPU stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from augsvc.client.meta import BatchMeta
from augsvc.client.staging import Fence, StagingRing

__all__ = ["CudaTransfer", "InFlight", "Transfer", "device_batches"]

Prepare = Callable[[Any], Any]


class InFlight(Protocol):
    """A batch on its way to the device."""

    fence: Fence  # done once its host buffer has been read

    def result(self) -> tuple[Any, Any]:
        """(images, labels) usable in the calling thread's current stream."""
        ...


class Transfer(Protocol):
    """Copies staged batches to a device; `pin` says whether the ring's buffers are pinned."""

    pin: bool

    def start(self, images: Any, labels: Any, prepare: Prepare) -> InFlight:
        """Issue the copy of one batch (and `prepare` of its images on the device)."""
        ...


class _CudaInFlight:
    def __init__(self, images: Any, labels: Any, copied: Any, ready: Any, device: Any) -> None:
        self.images, self.labels, self.fence, self.ready = images, labels, copied, ready
        self.device = device

    def result(self) -> tuple[Any, Any]:
        import torch

        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self.ready)
        self.images.record_stream(stream)
        self.labels.record_stream(stream)
        return self.images, self.labels


class CudaTransfer:
    """Host-to-device copies on a side CUDA stream owned by the loader."""

    pin = True

    def __init__(self, device: Any) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, images: Any, labels: Any, prepare: Prepare) -> InFlight:
        import torch

        with torch.cuda.stream(self.stream):
            images = images.to(self.device, non_blocking=True)
            # labels: a few KB of pageable memory, read before to() returns
            labels = labels.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
            images = prepare(images)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return _CudaInFlight(images, labels, copied, ready, self.device)


def device_batches(
    get: Callable[[int], tuple[Any, Any, BatchMeta]],
    ready: Callable[[int], bool],
    count: int,
    ring: StagingRing,
    transfer: Transfer,
    prepare: Prepare,
) -> Iterator[tuple[Any, Any, BatchMeta]]:
    """Positions 0..count-1 of `get` (staged arrays, labels, meta) as device batches, each
    copy issued one batch ahead where it has arrived (`ready`)."""

    def start(position: int) -> tuple[InFlight, BatchMeta]:
        array, labels, meta = get(position)
        inflight = transfer.start(ring.source(array), labels, prepare)
        ring.fence(array, inflight.fence)  # before `array`, the buffer's lease, is let go
        return inflight, meta

    ahead: tuple[InFlight, BatchMeta] | None = None
    for position in range(count):
        inflight, meta = ahead or start(position)
        ahead = start(position + 1) if position + 1 < count and ready(position + 1) else None
        images, labels = inflight.result()
        yield images, labels, meta
