"""AugmentLoader against real `augsvc serve` subprocesses (CPU, loopback) and real JPEGs.

The dataset is conftest's `jpeg_folder` (3 classes x 4 JPEGs). Outputs are small
(32 x 32) so that decoding dominates; the colour ops are off except in
`test_default_spec_matches_engine`, which needs the colour-kernel plugin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from epochs import engine_batches
from serverproc import running_server

from augsvc.client import AugmentLoader, AugsvcError, num_batches
from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.engine.dataset import open_dataset

pytestmark = pytest.mark.timeout(120)

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False)
NAME = "photos"
SEED = 7


@pytest.fixture(scope="module")
def servers(jpeg_folder: Path):
    """Two single-worker servers of `jpeg_folder` as "photos", shared by the module."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_server({NAME: jpeg_folder})) for _ in range(2)]


@pytest.fixture(scope="module")
def addresses(servers) -> list[str]:
    return [s.address for s in servers]


def fetch(addresses, spec=SPEC, **kwargs) -> list[tuple]:
    """Every (images, labels, meta) of one pass."""
    kwargs.setdefault("batch_size", 2)
    with AugmentLoader(addresses, NAME, spec, seed=SEED, return_meta=True, **kwargs) as loader:
        return list(loader)


def assert_same(got, want):
    assert len(got) == len(want)
    for (images, labels, meta), (w_images, w_labels, w_meta) in zip(got, want, strict=True):
        assert meta.index == w_meta.index
        np.testing.assert_array_equal(meta.sample_ids, w_meta.sample_ids)
        np.testing.assert_array_equal(labels, w_labels)
        assert images.dtype == w_images.dtype and images.shape == w_images.shape
        assert np.array_equal(images, w_images), f"batch {meta.index} differs"


@pytest.fixture(scope="module")
def two_ranks(addresses):
    """Both ranks' batches of epoch 1: world size 2, batch size 2, over both servers."""
    return [fetch(addresses, rank=r, world_size=2, epoch=1, streams_per_server=2,
                  batches_per_request=1) for r in range(2)]


def test_two_ranks_cover_the_epoch_once(two_ranks, jpeg_folder):
    index = open_dataset(jpeg_folder)
    seen = []
    for rank, batches in enumerate(two_ranks):
        plan = EpochPlan(len(index), 2, SEED, 1, rank, 2)
        assert len(batches) == len(plan) == 3
        for k, (images, labels, meta) in enumerate(batches):
            assert meta.index == k and meta.dropped == ()
            np.testing.assert_array_equal(meta.sample_ids, plan.batch(k).sample_ids)
            np.testing.assert_array_equal(labels, index.labels[meta.sample_ids])
            assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
            seen += meta.sample_ids.tolist()
    assert sorted(seen) == list(range(len(index)))


def test_bytes_equal_the_in_process_engine(two_ranks, jpeg_folder):
    for rank, batches in enumerate(two_ranks):
        want = engine_batches(jpeg_folder, SPEC, SEED, 1, rank, 2, 2)
        for (images, labels, meta), w in zip(batches, want, strict=True):
            np.testing.assert_array_equal(meta.sample_ids, w.sample_ids)
            np.testing.assert_array_equal(labels, w.labels)
            assert np.array_equal(images, w.images), f"rank {rank} batch {meta.index} differs"


def test_default_spec_matches_engine(addresses, jpeg_folder):
    spec = AugmentSpec(size=(32, 32))
    got = fetch(addresses, spec, batch_size=4)
    want = engine_batches(jpeg_folder, spec, SEED, 0, 0, 1, 4)
    for (images, labels, _), w in zip(got, want, strict=True):
        np.testing.assert_array_equal(labels, w.labels)
        assert np.array_equal(images, w.images)


def test_each_pass_is_the_next_epoch_like_the_engine(addresses, jpeg_folder):
    with AugmentLoader(addresses, NAME, SPEC, 4, SEED, return_meta=True) as loader:
        counted = [list(loader), list(loader)]  # no set_epoch: epochs 0 and 1
        chosen = []
        for _ in range(2):  # set_epoch(1) before every pass: epoch 1 every time
            loader.set_epoch(1)
            chosen.append(list(loader))
    for epoch, batches in [(0, counted[0]), (1, counted[1]), (1, chosen[0]), (1, chosen[1])]:
        want = engine_batches(jpeg_folder, SPEC, SEED, epoch, 0, 1, 4)
        for (images, labels, meta), w in zip(batches, want, strict=True):
            np.testing.assert_array_equal(meta.sample_ids, w.sample_ids)
            np.testing.assert_array_equal(labels, w.labels)
            assert np.array_equal(images, w.images), f"epoch {epoch} batch {meta.index} differs"
    assert not np.array_equal(counted[0][0][0], counted[1][0][0])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_sees_every_sample_once(addresses, jpeg_folder, world_size):
    """AugmentSpec.eval(), shuffle=False, tail="keep": each sample once, in dataset order."""
    index = open_dataset(jpeg_folder)
    spec = AugmentSpec.eval().replace(size=(32, 32), resize=32)
    batch_size, dealt = 5, []
    for rank in range(world_size):
        with AugmentLoader(addresses, NAME, spec, batch_size, SEED, rank, world_size,
                           shuffle=False, tail="keep", return_meta=True) as loader:
            batches = list(loader)
        assert len(batches) == num_batches(len(index), batch_size, world_size, "keep",
                                           rank=rank)
        for k, (images, labels, meta) in enumerate(batches):
            start = (k * world_size + rank) * batch_size
            np.testing.assert_array_equal(meta.sample_ids,
                                          np.arange(start, min(start + batch_size, len(index))))
            np.testing.assert_array_equal(labels, index.labels[meta.sample_ids])
            assert images.shape == (len(meta.sample_ids), 32, 32, 3)
            dealt += meta.sample_ids.tolist()
    assert sorted(dealt) == list(range(len(index)))


def test_resume_mid_epoch(addresses):
    kwargs = {"batch_size": 1, "tail": "pad", "epoch": 2, "streams_per_server": 1}
    with AugmentLoader(addresses, NAME, SPEC, seed=SEED, return_meta=True, **kwargs) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        state = loader.state_dict()
        rest = list(it)
    assert state["next_batch"] == 5 and state["epoch"] == 2
    assert len(head) + len(rest) == 12
    with AugmentLoader(addresses, NAME, SPEC, seed=SEED, return_meta=True, **kwargs) as loader:
        loader.load_state_dict(state)
        loader.set_epoch(2)
        resumed = list(loader)
    assert_same(resumed, rest)


def _kill_after(loader, n, kill):
    out = []
    for item in loader:
        out.append(item)
        if len(out) == n:
            kill()
    return out


def test_killed_server_mid_epoch(jpeg_folder, addresses, caplog):
    want = fetch(addresses, batch_size=1, epoch=3)
    with running_server({NAME: jpeg_folder}) as a, running_server({NAME: jpeg_folder}) as b:
        loader = AugmentLoader([a.address, b.address], NAME, SPEC, 1, SEED, epoch=3,
                               streams_per_server=1, batches_per_request=2, prefetch=4,
                               return_meta=True)
        with loader:
            got = _kill_after(loader, 3, lambda: a.kill())
        assert a.proc.poll() is not None
    assert_same(got, want)
    handed_back = [r.getMessage() for r in caplog.records if "handed back" in r.getMessage()]
    assert any(a.address in m for m in handed_back), handed_back


def test_killed_worker_mid_epoch(jpeg_folder, addresses):
    want = fetch(addresses, batch_size=1, epoch=4)
    with running_server({NAME: jpeg_folder}, workers=2) as server:
        workers = server.pids()
        assert len(workers) == 2
        loader = AugmentLoader(server.address, NAME, SPEC, 1, SEED, epoch=4,
                               streams_per_server=4, batches_per_request=1, return_meta=True)
        with loader:
            got = _kill_after(loader, 3, lambda: os.kill(workers[0], signal.SIGKILL))
    assert_same(got, want)


def test_torch_output_and_dataloader(addresses):
    torch = pytest.importorskip("torch")
    want = fetch(addresses, batch_size=4)
    loader = AugmentLoader(addresses, NAME, SPEC, 4, SEED, output="torch")
    data = torch.utils.data.DataLoader(loader.torch_dataset(), batch_size=None)
    got = list(data)
    assert len(got) == len(want) == 3
    for (images, labels), (w_images, w_labels, _) in zip(got, want, strict=True):
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and tuple(images.shape) == (4, 32, 32, 3)
        assert np.array_equal(images.numpy(), w_images)
        np.testing.assert_array_equal(labels.numpy(), w_labels)


def test_errors_carry_the_status(addresses):
    with pytest.raises(AugsvcError) as info:
        len(AugmentLoader(addresses, "nope", SPEC, 2))
    assert info.value.code is grpc.StatusCode.NOT_FOUND and "nope" in info.value.details

    # the server's own check: a spec the client would refuse, sent anyway
    loader = AugmentLoader(addresses, NAME, SPEC, 2)
    loader._spec_proto.p_hflip = 1.5
    start = time.monotonic()
    with pytest.raises(AugsvcError) as info:
        next(iter(loader))
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "p_hflip" in info.value.details and info.value.server in addresses
    assert time.monotonic() - start < 10  # not retried

    with pytest.raises(AugsvcError) as info:
        next(iter(AugmentLoader(addresses, NAME, SPEC, 1025, tail="pad")))
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "batch_size" in info.value.details


def test_wrong_token(jpeg_folder):
    with running_server({NAME: jpeg_folder}, "--token", "s3cret") as server:
        for token in (None, "wrong"):
            with pytest.raises(AugsvcError) as info:
                len(AugmentLoader(server.address, NAME, SPEC, 2, token=token))
            assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
        loader = AugmentLoader(server.address, NAME, SPEC, 4, token="s3cret")
        assert len(loader) == 3
        assert len(list(loader)) == 3


def test_class_balanced_epoch(jpeg_folder, tmp_path):
    """balance=True: rare classes are up-sampled; len() uses the server's class counts."""
    files = sorted(p for p in Path(jpeg_folder).rglob("*.jpg"))
    labels = [0] * 9 + [1] * 2 + [2] * 1
    manifest = tmp_path / "unbalanced.csv"
    manifest.write_text("path,label\n" + "".join(
        f"{p},{c}\n" for p, c in zip(files[:12], labels, strict=True)))
    # the manifest lists files of another folder: allowed with --allow-outside-root
    with running_server({"unbalanced": manifest}, "--allow-outside-root") as server, AugmentLoader(
            server.address, "unbalanced", SPEC, batch_size=3, seed=SEED, balance=True,
            return_meta=True) as loader:
        plan = EpochPlan(12, 3, SEED, 0, labels=labels, balance=True)
        assert len(loader) == len(plan) == 9
        got = list(loader)
    ids = np.concatenate([meta.sample_ids for _, _, meta in got])
    np.testing.assert_array_equal(ids, np.concatenate([plan.batch(k).sample_ids
                                                       for k in range(len(plan))]))
    assert np.bincount(np.concatenate([lab for _, lab, _ in got])).tolist() == [9, 9, 9]
