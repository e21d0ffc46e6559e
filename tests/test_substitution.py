"""Fixed batch shapes with corrupt images: real `augsvc serve` processes substitute a truncated
and an undecodable JPEG with the same stand-ins, augmented the same way, on every
server and across a failover; `corrupt="drop"` still shrinks the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serverproc import ServerProcess, running_server

from augsvc import wire
from augsvc.client import AugmentLoader
from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import open_dataset
from augsvc.engine.synth import make_dataset
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

pytestmark = pytest.mark.timeout(240)

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False, p_vflip=0.5)
NAME = "corrupt"
BATCH = 4
TRUNCATED, GARBAGE = "class_00/img_0003.jpg", "class_01/img_0006.jpg"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 small JPEGs, one truncated (caught when read) and one with a garbage Huffman table
    (structure intact: only DALI's decoder finds it broken)."""
    root = make_dataset(tmp_path_factory.mktemp("subst") / "d", num_classes=2, per_class=10,
                        size=(64, 80))
    truncated = root / TRUNCATED
    truncated.write_bytes(truncated.read_bytes()[:1500])
    garbage = root / GARBAGE
    data = bytearray(garbage.read_bytes())
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16
    garbage.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def corrupt_ids(folder: Path) -> set[int]:
    index = open_dataset(folder)
    assert len(index) == 20  # both pass indexing: they are found broken when read/decoded
    return {index.paths.index(str(folder / name)) for name in (TRUNCATED, GARBAGE)}


@pytest.fixture(scope="module")
def servers(folder: Path) -> Iterator[list[ServerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_server({NAME: folder}, "--dali-threads", "1"))
               for _ in range(2)]


def stream(server: ServerProcess, spec: AugmentSpec = SPEC, **fields: object
           ) -> list[wire.AssembledBatch]:
    values: dict[str, object] = {"dataset": NAME, "seed": 11, "epoch": 2, "batch_size": BATCH}
    values.update(fields)
    req = pb.StreamBatchesRequest(spec=spec_to_proto(spec), **values)
    options = wire.channel_options(own_connection=True)
    with grpc.insecure_channel(server.address, options=options) as channel:
        return list(wire.assemble(wire.AugmentStub(channel).StreamBatches(req, timeout=60)))


def header_rows(batch: wire.AssembledBatch) -> tuple:
    h = batch.header
    return (list(h.sample_ids), list(h.draw_ids), list(h.labels),
            [(s.row, s.sample_id, s.substitute_id, s.reason) for s in h.substituted])


def test_every_server_substitutes_alike_and_keeps_the_shape(
        servers: list[ServerProcess], folder: Path, corrupt_ids: set[int]) -> None:
    a, b = (stream(s) for s in servers)
    assert len(a) == len(b) == 5
    subs = [s for batch in a for s in batch.header.substituted]
    assert {s.sample_id for s in subs} == corrupt_ids
    reasons = {s.path: s.reason for s in subs}  # paths relative to the dataset root
    assert "truncated" in reasons[TRUNCATED] and "decode failed" in reasons[GARBAGE]
    for x, y in zip(a, b, strict=True):
        assert x.array.shape == (BATCH, 32, 32, 3) and not x.header.dropped
        assert header_rows(x) == header_rows(y)
        assert x.array.tobytes() == y.array.tobytes()
        for s in x.header.substituted:
            assert x.sample_ids[s.row] == s.substitute_id not in corrupt_ids
            assert x.draw_ids[s.row] < 0  # the substitute's own draw
    # exactly what the in-process engine makes of the same plan
    index = open_dataset(folder)
    engine = Augmenter(index, SPEC, IMAGENET, max_batch_size=BATCH, num_threads=1)
    try:
        plan = EpochPlan(len(index), BATCH, 11, 2)
        for k, got in enumerate(a):
            want = engine.run_batch(11, 2, plan.batch(k))
            assert got.array.tobytes() == want.images.tobytes()
            assert [s.substitute_id for s in got.header.substituted] == [
                s.substitute_id for s in want.substituted]
    finally:
        engine.close()


def test_drop_still_shrinks_the_batch(servers: list[ServerProcess],
                                      corrupt_ids: set[int]) -> None:
    batches = stream(servers[0], SPEC.replace(corrupt="drop"))
    assert {d.sample_id for b in batches for d in b.header.dropped} == corrupt_ids
    assert sum(b.array.shape[0] for b in batches) == 20 - 2
    for batch in batches:
        assert batch.array.shape[0] == BATCH - len(batch.header.dropped)
        assert not batch.header.substituted
        assert not corrupt_ids & set(batch.sample_ids.tolist())


def _seed_with_late_corrupt_samples(corrupt_ids: set[int]) -> int:
    """A seed whose epoch 0 puts both corrupt samples after batch 1 (so after the kill)."""
    for seed in range(1000):
        plan = EpochPlan(20, 2, seed, 0)
        early = {i for k in range(2) for i in plan.batch(k).sample_ids.tolist()}
        if not early & corrupt_ids:
            return seed
    raise AssertionError("no such seed")


def test_a_failover_mid_epoch_gives_the_same_substitutes(
        servers: list[ServerProcess], folder: Path, corrupt_ids: set[int]) -> None:
    seed = _seed_with_late_corrupt_samples(corrupt_ids)
    kwargs = {"batch_size": 2, "seed": seed, "streams_per_server": 1, "batches_per_request": 1,
              "prefetch": 2, "return_meta": True}
    b = servers[0]
    with running_server({NAME: folder}, "--dali-threads", "1") as a:
        with AugmentLoader(b.address, NAME, SPEC, **kwargs) as loader:
            want = list(loader)
        got = []
        with AugmentLoader([a.address, b.address], NAME, SPEC, **kwargs) as loader:
            for item in loader:
                got.append(item)
                if len(got) == 2:
                    a.kill()
        assert a.proc.poll() is not None
    assert len(got) == len(want) == 10
    subs = [s for _, _, meta in got for s in meta.substituted]
    assert {s.sample_id for s in subs} == corrupt_ids
    for (images, labels, meta), (w_images, w_labels, w_meta) in zip(got, want, strict=True):
        assert images.shape == (2, 32, 32, 3) and meta.dropped == ()
        assert meta.substituted == w_meta.substituted
        np.testing.assert_array_equal(meta.draw_ids, w_meta.draw_ids)
        np.testing.assert_array_equal(labels, w_labels)
        assert np.array_equal(images, w_images), f"batch {meta.index} differs"

