"""Exact evaluation against a real `augsvc serve`: no shuffling (`shuffle` false) and the
partial last round kept (tail "keep"): every sample exactly once, on one rank, with
its label. Raw gRPC stubs for the request fields, and the loader for ranks 1-3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serverproc import ServerProcess, running_server

from augsvc import wire
from augsvc.client import AugmentLoader
from augsvc.core.sampling import EpochPlan, rank_batches
from augsvc.core.spec import AugmentSpec
from augsvc.engine.dataset import open_dataset
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

pytestmark = pytest.mark.timeout(180)

EVAL = AugmentSpec.eval().replace(size=(24, 24), resize=24)
NAME = "photos"


@pytest.fixture(scope="module")
def server(jpeg_folder: Path) -> Iterator[ServerProcess]:
    with running_server({NAME: jpeg_folder}, "--dali-threads", "1", "--io-threads", "2") as proc:
        yield proc


def stream(server: ServerProcess, **fields: object) -> list[wire.AssembledBatch]:
    values: dict[str, object] = {"dataset": NAME, "seed": 3, "epoch": 1, "batch_size": 5}
    values.update(fields)
    req = pb.StreamBatchesRequest(spec=spec_to_proto(EVAL), **values)
    options = wire.channel_options(own_connection=True)
    with grpc.insecure_channel(server.address, options=options) as channel:
        return list(wire.assemble(wire.AugmentStub(channel).StreamBatches(req, timeout=60)))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_keep_without_shuffle_is_each_sample_once_in_dataset_order(
        server: ServerProcess, jpeg_folder: Path, world: int) -> None:
    index = open_dataset(jpeg_folder)
    n, b = len(index), 5  # 12 samples in batches of 5: the last round is partial
    owner: dict[int, int] = {}
    for rank in range(world):
        batches = stream(server, rank=rank, world_size=world, tail="keep", shuffle=False)
        assert len(batches) == rank_batches(n, b, world, rank, "keep")
        for k, got in enumerate(batches):
            start = (k * world + rank) * b
            want = np.arange(start, min(start + b, n))
            assert got.header.batch_index == k and got.array.shape == (len(want), 24, 24, 3)
            np.testing.assert_array_equal(got.sample_ids, want)
            np.testing.assert_array_equal(got.labels, index.labels[want])
            assert not got.header.dropped and not got.header.substituted
            owner.update(dict.fromkeys(want.tolist(), rank))
    assert sorted(owner) == list(range(n))


def test_shuffle_is_on_unless_turned_off(server: ServerProcess, jpeg_folder: Path) -> None:
    n = len(open_dataset(jpeg_folder))
    unset = np.concatenate([b.sample_ids for b in stream(server, tail="keep")])
    want = np.concatenate([EpochPlan(n, 5, 3, 1, tail="keep").batch(k).sample_ids
                           for k in range(3)])
    np.testing.assert_array_equal(unset, want)
    assert sorted(unset.tolist()) == list(range(n)) and unset.tolist() != list(range(n))
    ordered = stream(server, tail="drop_last", shuffle=False)
    np.testing.assert_array_equal(np.concatenate([b.sample_ids for b in ordered]), np.arange(10))
    # a sample's augmentation does not depend on the order it comes in
    shuffled = stream(server, tail="keep", shuffle=True)
    rows = {int(i): img for b in shuffled for i, img in zip(b.sample_ids, b.array, strict=True)}
    for b in ordered:
        for i, img in zip(b.sample_ids, b.array, strict=True):
            np.testing.assert_array_equal(img, rows[int(i)])


def test_keep_ranks_without_batches_get_an_empty_stream(server: ServerProcess) -> None:
    # 12 samples, batch 5, 3 ranks: rank 2 holds [10, 12) of the first round, nothing after
    assert [len(stream(server, rank=r, world_size=3, tail="keep")) for r in range(3)] == [1, 1, 1]
    assert stream(server, batch_size=12, rank=1, world_size=2, tail="keep") == []
    with pytest.raises(grpc.RpcError) as info:
        stream(server, batch_size=12, rank=1, world_size=2, tail="keep", batches=[0])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank 1 of 2 has 0 batch(es)" in info.value.details()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_loader_evaluates_each_sample_once(server: ServerProcess, jpeg_folder: Path,
                                               world: int) -> None:
    """issue 10.2 with the eval preset: the union over ranks is each sample exactly once,
    with the right labels; a rank's len() is its own batch count."""
    index = open_dataset(jpeg_folder)
    seen = []
    for rank in range(world):
        with AugmentLoader(server.address, NAME, EVAL, batch_size=5, seed=3, rank=rank,
                           world_size=world, tail="keep", return_meta=True) as loader:
            got = list(loader)
            assert len(got) == len(loader) == rank_batches(len(index), 5, world, rank, "keep")
        for images, labels, meta in got:
            assert images.shape[0] == len(labels) == len(meta.sample_ids) <= 5
            np.testing.assert_array_equal(labels, index.labels[meta.sample_ids])
            seen += meta.sample_ids.tolist()
    assert sorted(seen) == list(range(len(index)))
