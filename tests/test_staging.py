"""The staging ring (`augsvc.client.staging`) and the one-deep prefetch of `device_batches`,
without a server: aliasing, fences, spares, the assembler's buffers, the copy order."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from standin import FutureFence

from augsvc import wire
from augsvc.client.staging import StagingRing
from augsvc.client.transfer import device_batches

torch = pytest.importorskip("torch")

U8 = np.dtype("uint8")


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_ring_reuses_a_buffer_only_once_nothing_aliases_it():
    ring = StagingRing(2, pin=False)
    a = ring.allocate((2, 3, 4, 4), U8)
    first = address(a)
    view = a.reshape(-1).view(np.uint8)[5:]  # what BatchAssembler keeps
    tensor = torch.from_numpy(a)[1]  # what a consumer could keep
    del a
    assert ring.aliased == 1
    del view
    assert ring.aliased == 1  # the tensor still aliases it
    b = ring.allocate((2, 3, 4, 4), U8)
    assert address(b) != first
    del tensor
    assert ring.aliased == 1  # only b now
    c = ring.allocate((2, 3, 4, 4), U8)
    assert address(c) == first and ring.stats.reused == 1 and ring.stats.made == 2
    short = ring.allocate((1, 3, 4, 4), U8)  # a shorter last batch fits a freed buffer
    assert ring.stats.spare == 1  # ... but both are aliased: a spare
    del b, c, short
    assert ring.aliased == 0 and len(ring) == 2  # the spare was dropped again


def test_ring_waits_for_the_copy_of_a_free_buffer():
    ring = StagingRing(1, pin=False)
    a = ring.allocate((64,), U8)
    first = address(a)
    copy_done = threading.Event()

    class Gate:
        def query(self) -> bool:
            return copy_done.is_set()

        def synchronize(self) -> None:
            assert copy_done.wait(30)

    ring.fence(a, Gate())
    del a  # unaliased, but its copy is still running
    got: list[np.ndarray] = []
    waiter = threading.Thread(target=lambda: got.append(ring.allocate((64,), U8)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # at capacity: it waits for the copy
    copy_done.set()
    waiter.join(10)
    assert address(got[0]) == first and ring.stats.waited == 1 and len(ring) == 1


def test_ring_prefers_new_buffers_to_waiting_below_capacity():
    ring = StagingRing(2, pin=False)
    a = ring.allocate((64,), U8)
    ring.fence(a, FutureFence(Future()))  # a copy that never finishes
    first = address(a)
    del a
    b = ring.allocate((64,), U8)
    assert address(b) != first and ring.stats.waited == 0 and ring.stats.made == 2
    with pytest.raises(ValueError, match="not one this ring handed out"):
        ring.fence(np.zeros(64, np.uint8), FutureFence(Future()))


def test_assembler_fills_ring_buffers_and_gives_them_back():
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8) for _ in range(3)]
    frames = [[wire.decode_frame(f) for f in wire.encode_batch(
        p, batch_index=k, layout="NCHW", labels=[0, 1, 2], sample_ids=[0, 1, 2],
        draw_ids=[0, 1, 2], chunk_bytes=100)] for k, p in enumerate(payloads)]
    ring = StagingRing(1, pin=False)
    assembler = wire.BatchAssembler(ring.allocate)
    for frame in frames[0][:3]:  # a stream failing mid-batch...
        assert assembler.feed(frame) is None
    assert ring.aliased == 1
    assembler.reset()  # ... drops its partial batch: the buffer comes back
    assert ring.aliased == 0
    for k, batch_frames in enumerate(frames):
        done = [assembler.feed(f) for f in batch_frames]
        assert all(d is None for d in done[:-1])
        assert np.array_equal(done[-1].array, payloads[k])
        del done  # the batch, the last alias of its buffer
    assert ring.stats.made == 1 and ring.stats.reused == 3 and ring.stats.spare == 0


@pytest.mark.parametrize("arrived", [True, False])
def test_next_copy_is_issued_before_a_batch_is_yielded(host_transfer, arrived):
    ring = StagingRing(8, pin=False)

    def get(position: int) -> tuple[np.ndarray, Any, int]:
        array = ring.allocate((2, 4), U8)
        array[:] = position
        return array, torch.zeros(2, dtype=torch.int64), position

    transfer = host_transfer()
    starts = []
    for position, (images, _, meta) in enumerate(
            device_batches(get, lambda p: arrived, 5, ring, transfer, lambda x: x)):
        assert meta == position and bool((images == position).all())
        starts.append(transfer.starts)
    # arrived: batch k+1's copy is issued before k is yielded (none past the end)
    assert starts == ([2, 3, 4, 5, 5] if arrived else [1, 2, 3, 4, 5])
