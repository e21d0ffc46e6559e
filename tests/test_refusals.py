"""Refusals a retry fixes and refusals it cannot: a real `augsvc serve`, a real loader.

A server over --max-streams (RESOURCE_EXHAUSTED) or draining (UNAVAILABLE) marks its
refusal with trailing metadata `augsvc-retry`; the loader backs off and fetches the
batches again (counted in `stats().retries`). The other RESOURCE_EXHAUSTED, a batch over
--max-batch-size, carries no mark and fails the pass at once with the server's message.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from epochs import engine_batches
from replicas import assert_epoch, consume
from serverproc import running_server
from test_server import FAST, SMALL, connect, fetch, rpc_error, stream_request, wait_for

from augsvc import AugsvcError, wire
from augsvc.client import AugmentLoader
from augsvc.core.spec import AugmentSpec
from augsvc.wire._proto import augment_pb2 as pb

SEED, BATCH = 7, 2
BIG = AugmentSpec(size=(224, 224), hsv=False, pca=False)  # a held stream fills --prefetch


def _hint(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(wire.RETRY_KEY)


def test_a_full_server_is_retried_and_the_epoch_completes(jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST, "--max-streams", "1",
                        "--prefetch", "1") as server, connect(server.address) as channel:
        held = wire.AugmentStub(channel).StreamBatches(
            stream_request(spec=BIG, batch_size=4, batches=[0, 1, 2] * 10), timeout=120)
        assert isinstance(next(held), pb.BatchHeader)  # it runs and holds the only slot
        busy = rpc_error(lambda: fetch(channel, stream_request()))
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _hint(busy) == "busy" and "--max-streams" in busy.details()

        loader = AugmentLoader([server.address], "photos", SMALL, BATCH, SEED,
                               streams_per_server=1, reconnect_timeout=60)
        released = threading.Event()

        def release_when_refused() -> None:  # the loader has been refused, and retried
            wait_for(lambda: loader.stats().retries >= 2, 30, "two refused calls")
            held.cancel()
            released.set()

        releaser = threading.Thread(target=release_when_refused, daemon=True)
        releaser.start()
        with loader:
            got = consume(loader, stall_s=40)
        releaser.join(5)
        assert released.is_set()
        assert_epoch(got, engine_batches(jpeg_folder, SMALL, SEED, 0, batch_size=BATCH))
        stats = loader.stats()
        assert stats.retries >= 2 and stats.servers[server.address].failures == stats.retries
        assert stats.batches == len(got)


def test_a_batch_over_the_limit_fails_at_once_with_the_servers_message(
        jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST, "--max-batch-size", "4") as server:
        with connect(server.address) as channel:
            over = rpc_error(lambda: fetch(channel, stream_request(batch_size=8)))
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _hint(over) is None
        loader = AugmentLoader([server.address], "photos", SMALL, 8, SEED,
                               reconnect_timeout=60)
        started = time.monotonic()
        with loader, pytest.raises(AugsvcError) as info:
            next(iter(loader))
        assert time.monotonic() - started < 10  # no back-off, no waiting for a budget
        error = info.value
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over this server's limit of 4" in str(error) and "--max-batch-size" in str(error)
        assert loader.stats().retries == 0


def test_a_server_that_stays_full_fails_the_pass_saying_so(jpeg_folder: Path) -> None:
    """Busy refusals for all of reconnect_timeout: an error that names the limit, not "no
    server answered"."""
    with running_server({"photos": jpeg_folder}, *FAST, "--max-streams", "1",
                        "--prefetch", "1") as server, connect(server.address) as channel:
        held = wire.AugmentStub(channel).StreamBatches(
            stream_request(spec=BIG, batch_size=4, batches=[0, 1, 2] * 10), timeout=120)
        assert isinstance(next(held), pb.BatchHeader)  # it runs and holds the only slot
        loader = AugmentLoader([server.address], "photos", SMALL, BATCH, SEED,
                               streams_per_server=1, reconnect_timeout=2)
        with loader, pytest.raises(AugsvcError) as info:
            next(iter(loader))
        held.cancel()
        error = info.value
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "every augsvc server refused the streams as full for 2 s" in str(error)
        assert "--max-streams" in str(error) and server.address in str(error)
        assert loader.stats().retries >= 1
