"""Plans cost what a request reads: a real `augsvc serve` answers wide requests fast and its
memory stays bounded; the shared epoch orders are bounded in bytes.

RSS is read from /proc for the server's parent and worker processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serverproc import ServerProcess, running_server

from augsvc import wire
from augsvc.core.sampling import EpochOrder, EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.engine.synth import make_dataset
from augsvc.server import load_catalog
from augsvc.server.admission import Admission
from augsvc.server.batchcache import BatchCache
from augsvc.server.pipelines import PipelinePool
from augsvc.server.plans import MIN_PLAN_BYTES, OrderCache, plan_budget
from augsvc.server.servicer import AugmentServicer, _Abort
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

pytestmark = pytest.mark.timeout(180)

SPEC = AugmentSpec(size=(16, 16), hsv=False, pca=False)
NUM_SAMPLES = 6
MIB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 small JPEGs (48 x 64), so a batch of 1024 of them decodes in a second or two."""
    return make_dataset(tmp_path_factory.mktemp("tiny") / "d", num_classes=2, per_class=3,
                        size=(48, 64))


@pytest.fixture(scope="module")
def server(tiny: Path) -> Iterator[ServerProcess]:
    with running_server({"tiny": tiny}, "--dali-threads", "1", "--io-threads", "2") as proc:
        yield proc


def rss_bytes(server: ServerProcess) -> int:
    """Resident memory of the server's parent and workers together."""
    total = 0
    for pid in (server.proc.pid, *server.pids()):
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    return total


def request(**fields: object) -> pb.StreamBatchesRequest:
    values: dict[str, object] = {"dataset": "tiny", "seed": 1, "batch_size": 1024,
                                 "world_size": 16384, "tail": "pad", "batches": [0]}
    values.update(fields)
    return pb.StreamBatchesRequest(spec=spec_to_proto(SPEC), **values)


def call(server: ServerProcess, req: pb.StreamBatchesRequest) -> list[wire.AssembledBatch]:
    options = wire.channel_options(own_connection=True)
    with grpc.insecure_channel(server.address, options=options) as channel:
        frames = wire.AugmentStub(channel).StreamBatches(req, timeout=30)
        return list(wire.assemble(frames))


def refusal(server: ServerProcess, req: pb.StreamBatchesRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(server, req)
    return info.value


def test_wide_plans_pin_no_memory(server: ServerProcess) -> None:
    """issue 9.4: batch_size 1024 x world_size 16384 with tail "pad" built a 16.7M-entry plan
    per seed (8 cached: +2 GB). Here each seed's plan is built and the request then
    refused (batch 1 is out of range), so only planning is measured."""
    call(server, request(world_size=1, batch_size=4, tail="drop_last"))  # warm up
    before = rss_bytes(server)
    for seed in range(8):
        error = refusal(server, request(seed=seed, batches=[1]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch 1 is out of range" in error.details() and "has 1 batch" in error.details()
    grown = rss_bytes(server) - before
    print(f"\nserver RSS {before / MIB:.0f} MiB; after 8 wide plans +{grown / MIB:.1f} MiB")
    assert grown < 32 * MIB


def test_the_45_byte_request_gets_its_batch(server: ServerProcess) -> None:
    req = request(seed=3, world_size=16384, rank=16383)
    before = rss_bytes(server)
    (batch,) = call(server, req)
    after = rss_bytes(server)
    print(f"\nserver RSS {before / MIB:.0f} MiB; after one batch of 1024: {after / MIB:.0f} MiB")
    assert batch.array.shape == (1024, 16, 16, 3)
    want = EpochPlan(NUM_SAMPLES, 1024, 3, 0, 16383, 16384, "pad").batch(0)
    np.testing.assert_array_equal(batch.sample_ids, want.sample_ids)
    np.testing.assert_array_equal(batch.draw_ids, want.draw_ids)


def test_a_world_size_of_2_32_minus_1(server: ServerProcess) -> None:
    """Was an uncaught MemoryError (UNKNOWN): now INVALID_ARGUMENT naming the limit, or, under
    the limit, the one batch that rank reads, computed alone."""
    error = refusal(server, request(world_size=2**32 - 1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of 2^40" in error.details() and "batch_size x world_size" in (
        error.details())
    rank = 2**32 - 2
    (batch,) = call(server, request(batch_size=1, world_size=2**32 - 1, rank=rank))
    want = EpochPlan(NUM_SAMPLES, 1, 1, 0, rank, 2**32 - 1, "pad").batch(0)
    assert batch.sample_ids.tolist() == want.sample_ids.tolist()
    assert batch.draw_ids.tolist() == want.draw_ids.tolist()
    assert want.draw_ids[0] == want.sample_ids[0] + (rank // NUM_SAMPLES) * NUM_SAMPLES


def test_an_order_larger_than_the_budget_is_refused(tmp_path: Path) -> None:
    """Class balancing can up-sample a skewed dataset far beyond its size: such an order is
    refused before it is built, with the limit in the message."""
    root = make_dataset(tmp_path / "d", num_classes=2, per_class=2, size=(16, 16))
    manifest = tmp_path / "skewed.csv"
    files = sorted(root.rglob("*.jpg"))
    manifest.write_text("path,label\n" + "".join(f"{p},{i}\n" for i, p in enumerate(files)))
    catalog = load_catalog({"skewed": manifest})  # 4 classes of 1: balancing is a no-op...
    cache = BatchCache(0)
    pool = PipelinePool(device="cpu", device_id=0, dali_threads=1, io_threads=1, max_idle=0,
                        max_memory=1 << 20, depth=1, cache=cache)
    servicer = AugmentServicer(catalog, pool, Admission(1), max_batch_size=8, cache=cache,
                               stall_timeout=0, metrics=pool.metrics)
    try:
        servicer.orders = OrderCache(max_bytes=8 * 4 - 1)  # ...but the budget is under 4
        req = pb.StreamBatchesRequest(dataset="skewed", seed=0, batch_size=1, balance=True,
                                      spec=spec_to_proto(SPEC))
        with pytest.raises(_Abort) as info:
            servicer._validate(req)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "up-samples the dataset to 4 entries" in info.value.details
        assert "limit of 0 MiB for epoch orders" in info.value.details
        assert servicer.orders.nbytes == 0
        servicer.orders = OrderCache(max_bytes=1 << 20)
        assert len(servicer._validate(req).plan) == 4
    finally:
        servicer.join_streams(timeout=1.0)


# ---------------------------------------------------------------------------
# the order cache


def _order(seed: int, n: int = 1000) -> EpochOrder:
    return EpochOrder.build(n, seed, 0)


def test_the_order_cache_is_bounded_in_bytes_lru_first() -> None:
    one = _order(0).nbytes
    assert one == 4000
    cache = OrderCache(max_bytes=3 * one)
    for seed in range(3):
        cache.get(seed, lambda s=seed: _order(s))
    assert cache.nbytes == 3 * one
    cache.get(0, lambda: pytest.fail("seed 0 is held"))  # now the most recent
    cache.get(3, lambda: _order(3))
    assert cache.nbytes == 3 * one
    built = []
    cache.get(1, lambda: built.append(1) or _order(1))  # 1 was the least recent: evicted
    assert built == [1]
    big = cache.get("big", lambda: _order(0, n=4000))  # over the whole budget: not kept
    assert len(big) == 4000 and cache.nbytes <= 3 * one


def test_concurrent_requests_build_an_order_once() -> None:
    cache = OrderCache(max_bytes=1 << 20)
    builds = []
    gate = threading.Event()

    def build() -> EpochOrder:
        builds.append(1)
        gate.wait(5)
        return _order(7)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", build)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and len(results) == 8
    assert all(r is results[0] for r in results)


def test_a_failed_build_is_not_cached() -> None:
    cache = OrderCache(max_bytes=1 << 20)

    def fail() -> EpochOrder:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        cache.get("k", fail)
    assert len(cache.get("k", lambda: _order(1))) == 1000


def test_the_budget_holds_four_orders_of_the_largest_dataset() -> None:
    assert plan_budget([]) == plan_budget([1000]) == MIN_PLAN_BYTES
    assert plan_budget([100_000_000, 10]) == 4 * 4 * 100_000_000
