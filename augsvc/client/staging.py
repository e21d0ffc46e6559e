"""Reusable host buffers for batches bound for a device: a small ring of (pinned) staging buffers.

`StagingRing.allocate` is the `wire.BatchAssembler` allocator of a `device="cuda"` pass:
the stream threads assemble each batch straight into one of its buffers. A buffer is
handed out again only when both hold:

* no array aliases it any more: each batch's array carries a `weakref.finalize` that
  gives the buffer back when the last numpy view of it, or the last tensor made from it
  by `torch.from_numpy`, is gone (a batch the reorder buffer threw away, a tensor a
  consumer still holds; the partial batch of a failed call once the garbage collector
  frees the stream's frame, which grpc's call and its traceback keep in a cycle);
* the device copy that reads it has finished: `fence(array, done)` attaches the copy's
  completion (a CUDA event, anything with `query()` and `synchronize()`) before the
  array is let go.

The ring holds `capacity` buffers (the pass's read-ahead plus the batches in transfer).
When every buffer is aliased or being copied from, an allocation waits for the copy
from the buffer freed first; when every one is aliased, it makes a spare one, dropped
again once free, so a consumer holding batches costs memory, never a wrong batch.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["Fence", "RingStats", "StagingRing"]


class Fence(Protocol):
    """The completion of a device copy (torch.cuda.Event has both methods)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class RingStats:
    """What a ring did, for tests and tuning."""

    made: int = 0  # buffers allocated (pinned allocations: the slow part)
    reused: int = 0  # batches assembled into a buffer used before
    waited: int = 0  # allocations that waited for a device copy to finish
    spare: int = 0  # buffers made beyond the capacity (every buffer was aliased)


class _Slot:
    __slots__ = ("address", "fence", "nbytes", "tensor")

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor  # flat uint8
        self.nbytes = int(tensor.numel())
        self.address = int(tensor.data_ptr())
        self.fence: Fence | None = None

    def copied(self) -> bool:
        return self.fence is None or self.fence.query()


class StagingRing:
    """Host staging buffers reused once unaliased and copied; `pin` makes them page-locked."""

    def __init__(self, capacity: int, pin: bool) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        import torch

        self._torch = torch
        self._dtypes = {name: getattr(torch, name) for name in ("uint8", "float16", "float32")}
        self.capacity, self.pin = capacity, pin
        self.stats = RingStats()
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}  # every live buffer, by address
        self._leased: set[int] = set()  # addresses some array aliases
        self._free: deque[_Slot] = deque()  # unaliased, oldest first (copy maybe running)
        # appended to by the finalizers, which may run in any thread, even one holding
        # _lock (a garbage collection inside allocate): a deque append needs no lock
        self._released: deque[_Slot] = deque()

    def __len__(self) -> int:
        """Buffers the ring holds now (spares included)."""
        return len(self._slots)

    @property
    def aliased(self) -> int:
        """Buffers some live array or tensor aliases now."""
        with self._lock:
            self._collect()
            return len(self._leased)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable C-contiguous array of `shape` and `dtype` in a free buffer."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:  # a batch whose samples were all dropped: nothing to stage
            return np.empty(shape, dtype)
        with self._lock:
            self._collect()
            slot, wait = self._pick(nbytes)
        if wait:
            slot.fence.synchronize()  # outside the lock: other streams go on meanwhile
        slot.fence = None
        array = slot.tensor[:nbytes].view(self._dtypes[dtype.name]).view(shape).numpy()
        # every numpy view of `array` keeps it alive (its base is a tensor, not an array,
        # so views do not skip it), and so does torch.from_numpy(array)
        weakref.finalize(array, self._released.append, slot).atexit = False
        return array

    def source(self, array: np.ndarray) -> Any:
        """A tensor over `array`'s bytes that does not keep it alive (to copy from)."""
        if array.nbytes == 0:
            return self._torch.from_numpy(array)
        with self._lock:
            slot = self._slot(array)
        return slot.tensor[: array.nbytes].view(self._dtypes[array.dtype.name]).view(
            array.shape)

    def fence(self, array: np.ndarray, done: Fence) -> None:
        """Keep `array`'s buffer from reuse until `done` (call it while `array` is alive)."""
        if array.nbytes == 0:
            return
        with self._lock:
            self._slot(array).fence = done

    def _slot(self, array: np.ndarray) -> _Slot:
        address = array.__array_interface__["data"][0]
        slot = self._slots.get(address)
        if slot is None or address not in self._leased:
            raise ValueError("the array is not one this ring handed out")
        return slot

    def _collect(self) -> None:
        """Move released buffers to the free list; drop free spares whose copy is done."""
        while self._released:
            slot = self._released.popleft()
            self._leased.discard(slot.address)
            self._free.append(slot)
        if len(self._slots) > self.capacity:
            for slot in [s for s in self._free if s.copied()]:
                if len(self._slots) <= self.capacity:
                    break
                self._drop(slot)

    def _pick(self, nbytes: int) -> tuple[_Slot, bool]:
        """A buffer of at least `nbytes` to lease, and whether its copy must be waited for."""
        pending = None
        for slot in self._free:
            if slot.nbytes >= nbytes:
                if slot.copied():
                    self.stats.reused += 1
                    return self._lease(slot), False
                pending = pending or slot
        if len(self._slots) >= self.capacity:  # a free buffer too small to reuse makes room
            small = next((s for s in self._free if s.nbytes < nbytes and s.copied()), None)
            if small is not None:
                self._drop(small)
        if len(self._slots) < self.capacity:
            return self._new(nbytes), False
        if pending is not None:
            self.stats.waited += 1
            self.stats.reused += 1
            return self._lease(pending), True
        self.stats.spare += 1
        return self._new(nbytes), False

    def _lease(self, slot: _Slot) -> _Slot:
        if slot in self._free:
            self._free.remove(slot)
        self._leased.add(slot.address)
        return slot

    def _new(self, nbytes: int) -> _Slot:
        tensor = self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=self.pin)
        slot = _Slot(tensor)
        self._slots[slot.address] = slot
        self.stats.made += 1
        return self._lease(slot)

    def _drop(self, slot: _Slot) -> None:
        self._free.remove(slot)
        del self._slots[slot.address]
