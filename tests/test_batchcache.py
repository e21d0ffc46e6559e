"""The server's batch cache: bounded LRU, and repeated requests served from memory."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from augsvc import wire
from augsvc.core.spec import AugmentSpec
from augsvc.server import ServerConfig, start_server
from augsvc.server.batchcache import BatchCache
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto


def test_lru_bound_and_order() -> None:
    cache = BatchCache(max_bytes=10)
    cache.put("a", (b"1234",))
    cache.put("b", (b"12", b"34"))
    assert cache.get("a") == (b"1234",)  # "a" is now the most recent
    cache.put("c", (b"1234",))  # 12 bytes: evicts the least recent, "b"
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 8
    cache.put("huge", (b"x" * 11,))  # larger than the whole cache: not stored
    assert cache.get("huge") is None and cache.nbytes == 8
    assert BatchCache(0).get("a") is None


def test_repeated_request_is_served_from_the_cache(jpeg_folder: Path) -> None:
    config = ServerConfig(datasets={"photos": jpeg_folder}, port=0, device="cpu",
                          dali_threads=1, io_threads=2, batch_cache_mb=64)
    server = start_server(config)
    spec = AugmentSpec(size=(32, 32), hsv=False, pca=False)
    request = pb.StreamBatchesRequest(dataset="photos", spec=spec_to_proto(spec), seed=3,
                                      epoch=0, batch_size=4, batches=[0, 2])
    other = pb.StreamBatchesRequest(dataset="photos", spec=spec_to_proto(spec), seed=4,
                                    epoch=0, batch_size=4, batches=[0, 2])
    cache = server.servicer.cache
    try:
        with grpc.insecure_channel(server.address, options=wire.channel_options()) as channel:
            stub = wire.AugmentStub(channel)

            def fetch(req: pb.StreamBatchesRequest) -> list[wire.AssembledBatch]:
                return list(wire.assemble(stub.StreamBatches(req, timeout=60)))

            first = fetch(request)
            hits = cache.hits
            again = fetch(request)
            assert cache.hits == hits + 2
            different = fetch(other)  # another seed is another key
            assert cache.hits == hits + 2
            mixed = pb.StreamBatchesRequest()
            mixed.CopyFrom(request)
            mixed.ClearField("batches")
            mixed.batches.extend([0, 1, 2])  # 0 and 2 cached, 1 made by the pipeline
            partly = fetch(mixed)
            assert cache.hits == hits + 4
    finally:
        server.shutdown(grace=1)
    for a, b in zip(first, again, strict=True):
        assert a.header == b.header and np.array_equal(a.array, b.array)
    assert not np.array_equal(first[0].array, different[0].array)
    assert [b.header.batch_index for b in partly] == [0, 1, 2]
    for a, b in zip(first, partly[::2], strict=True):
        assert a.header == b.header and np.array_equal(a.array, b.array)
