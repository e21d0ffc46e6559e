"""A loader's streams end spread evenly over the workers of `augsvc serve --workers N`.

Issue 9 ("16 loaders on one --workers 2 server"): the kernel's SO_REUSEPORT hash put
both connections of some loaders on one worker, and those loaders got half the images
of the others. Each call now names its worker (initial metadata `augsvc-worker`); a
stream that crowds a worker re-dials between calls (`augsvc.client.placement`).
Checked here with real servers, real DALI, on loopback: the kernel's own count of each
loader's connections per worker (/proc), and every pass equal to the in-process engine.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from epochs import engine_batches
from replicas import assert_epoch
from serverproc import running_server

from augsvc.client import AugmentLoader
from augsvc.client.placement import REDIAL_LIMIT, Placement
from augsvc.core.spec import AugmentSpec
from augsvc.engine.synth import make_dataset
from augsvc.server.app import AugmentServer
from augsvc.server.config import ServerConfig

pytestmark = pytest.mark.timeout(300)

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False)
NAME, SEED = "photos", 5
FAST = ("--dali-threads", "1", "--io-threads", "2")
LOADERS = 3  # all of them start even by chance with p = 1/8 (2 streams), 5 % (4 streams)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 small JPEGs: 48 calls of one batch of one image per pass."""
    return make_dataset(tmp_path_factory.mktemp("spread"), num_classes=2, per_class=24,
                        size=(48, 64))


@pytest.fixture(scope="module")
def reference(folder: Path) -> list:
    return engine_batches(folder, SPEC, SEED, 0, batch_size=1)


def _loader(address: str, streams: int) -> AugmentLoader:
    return AugmentLoader(address, NAME, SPEC, 1, SEED, streams_per_server=streams,
                         batches_per_request=1)


def _redials(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " re-dials " in r.getMessage()]


def _settled(server, want: list[int], timeout: float = 10.0) -> list[int]:
    """This process's connections per worker, once they equal `want` (replaced channels
    close in the background) or `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while (got := server.connections_from(os.getpid())) != want \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


@pytest.mark.parametrize("streams", [2, 4])
def test_streams_end_spread_over_two_workers(folder, reference, streams, caplog):
    caplog.set_level(logging.DEBUG, logger="augsvc.client")
    with running_server({NAME: folder}, *FAST, workers=2) as server:
        address = server.address
        loaders = [_loader(address, streams) for _ in range(LOADERS)]
        try:
            for i, loader in enumerate(loaders):
                assert_epoch(list(loader), reference, f"loader {i}")
                seen = loader.stats().servers[address]
                assert seen.workers == (streams // 2, streams // 2), (i, seen)
            # the kernel agrees: every loader's connections are still open, spread evenly
            want = [LOADERS * streams // 2] * 2
            assert _settled(server, want) == want
            redials = sum(loader.stats().servers[address].redials for loader in loaders)
            assert redials == len(_redials(caplog))
            # a second pass keeps the connections: nothing to even out any more
            before = loaders[0].stats().servers[address].redials
            loaders[0].set_epoch(0)
            assert_epoch(list(loaders[0]), reference, "loader 0, second pass")
            assert loaders[0].stats().servers[address].redials == before
        finally:
            for loader in loaders:
                loader.close()


def _pass_on_one_worker(folder: Path, reference: list, worker: tuple[int, int] | None,
                        streams: int):
    """One pass through an in-process server (no worker processes) whose calls name
    `worker` (None: no metadata); equal to the engine's epoch; the server's ServerStats."""
    config = ServerConfig(datasets={NAME: folder}, port=0, device="cpu", dali_threads=1,
                          io_threads=2)
    server = AugmentServer(config, worker=worker).start()
    try:
        with _loader(server.address, streams) as loader:
            assert_epoch(list(loader), reference)
            return loader.stats().servers[server.address]
    finally:
        server.shutdown(grace=0)


def test_a_server_without_worker_metadata_is_left_alone(folder, reference, caplog):
    caplog.set_level(logging.DEBUG, logger="augsvc.client")
    seen = _pass_on_one_worker(folder, reference, None, 4)
    assert (seen.workers, seen.redials) == ((), 0)
    assert _redials(caplog) == []


def test_redials_are_bounded_when_the_workers_cannot_be_evened(folder, reference, caplog):
    """A server whose every call says "worker 0 of 2": worker 1 never gets a stream, so
    each slot re-dials REDIAL_LIMIT times in a row and then stays."""
    caplog.set_level(logging.DEBUG, logger="augsvc.client")
    seen = _pass_on_one_worker(folder, reference, (0, 2), 2)
    assert seen.workers == (2, 0)
    messages = _redials(caplog)
    per_slot = {slot: sum(1 for m in messages if f"-{slot} re-dials" in m) for slot in (0, 1)}
    assert len(messages) == seen.redials
    assert per_slot[1] == REDIAL_LIMIT, messages  # the highest slot goes first, to the bound
    assert 0 < per_slot[0] <= REDIAL_LIMIT, messages  # then the other one, to the bound


def test_placement_rule():
    """The rule on its own: who re-dials, for more slots than workers and the reverse."""
    p = Placement(4)
    for slot in range(3):
        p.landed(slot, (0, 2))
    assert p.redial(2) == 0  # slot 3 has not landed: too soon
    p.landed(3, (0, 2))
    assert [p.redial(s) for s in (0, 1, 2)] == [0, 0, 0]
    assert p.redial(3) == 1  # the highest slot on the crowded worker
    assert p.redial(2) == 1  # 3 against 0 + 1 on its way: the next one goes too
    assert p.redial(1) == 0 and p.loads() == (2, 0)  # 2 against 0 + 2 on their way
    p.landed(3, (1, 2))
    p.landed(2, (1, 2))
    assert p.loads() == (2, 2) and [p.redial(s) for s in range(4)] == [0, 0, 0, 0]

    three = Placement(3)  # 3 slots on 2 workers: 2 + 1 is even
    for slot, worker in enumerate((0, 0, 1)):
        three.landed(slot, (worker, 2))
    assert [three.redial(s) for s in range(3)] == [0, 0, 0]

    many = Placement(2)  # 2 slots on 4 workers: 1 + 1 + 0 + 0 is even, 2 + 0 + 0 + 0 not
    many.landed(0, (3, 4))
    many.landed(1, (3, 4))
    assert many.redial(0) == 0 and many.redial(1) == 1
    many.landed(1, (2, 4))
    assert many.loads() == (0, 0, 1, 1) and many.redial(1) == 0
