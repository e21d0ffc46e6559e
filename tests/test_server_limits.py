"""What one client can take from a server: unread streams, the memory budget, a flood of
streams; real `augsvc serve` processes on loopback, real JPEGs, raw gRPC stubs.

Memory is the worker's VmRSS (/proc/PID/status) and waits poll for a condition with a
generous deadline, so a loaded 2-core machine makes these slower, not flaky.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from serverproc import running_server
from test_server import (
    FAST,
    SERVING,
    TOKEN,
    assert_healthy,
    connect,
    fetch,
    health_status,
    rpc_error,
    stream_request,
    wait_for,
)

from augsvc import wire
from augsvc.client.errors import FATAL_CODES
from augsvc.core.spec import AugmentSpec
from augsvc.engine.synth import make_dataset

MiB = 1 << 20
# 16 images of 448x448x3 uint8: 9.6 MB a batch, from small JPEGs (quick to decode)
BIG = AugmentSpec(size=(448, 448), hsv=False, pca=False)
BATCH = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 small JPEGs: two batches of 16."""
    return make_dataset(tmp_path_factory.mktemp("limits"), num_classes=2, per_class=16,
                        size=(96, 128))


def status_value(pid: int, field: str) -> int:
    """VmRSS (bytes) or Threads of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            value = int(line.split()[1])
            return value * 1024 if field == "VmRSS" else value
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime in clock ticks


@contextlib.contextmanager
def peak_of(pid: int, field: str) -> Iterator[list[int]]:
    """Sample a /proc/PID/status field every 50 ms; [peak] while and after the block."""
    peak = [status_value(pid, field)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(OSError, KeyError):
                peak[0] = max(peak[0], status_value(pid, field))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def settled_rss(pid: int) -> int:
    """The worker's RSS once it has been idle (no CPU time used) for a second."""
    def idle() -> bool:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        return cpu_seconds(pid) - before < 0.02

    wait_for(idle, 60, "the worker to go idle")
    return status_value(pid, "VmRSS")


def warm_up(address: str) -> None:
    """One complete stream: the pipeline is built, the process's memory at its base."""
    with connect(address) as channel:
        batches = fetch(channel, stream_request(spec=BIG, batch_size=BATCH, batches=[0, 1]))
    assert [b.array.shape for b in batches] == [(BATCH, 448, 448, 3)] * 2


def open_unread(channel: grpc.Channel, n: int, batches: list[int]) -> list[grpc.Future]:
    stub = wire.AugmentStub(channel)
    request = stream_request(spec=BIG, batch_size=BATCH, batches=batches)
    return [stub.StreamBatches(request, timeout=120) for _ in range(n)]


def test_unread_streams_are_cancelled_and_their_memory_returned(folder: Path) -> None:
    with running_server({"photos": folder}, *FAST, "--stall-timeout", "2") as server:
        (worker,) = server.pids()
        warm_up(server.address)
        base = settled_rss(worker)
        with connect(server.address) as channel, peak_of(worker, "VmRSS") as peak:
            calls = open_unread(channel, 8, [0, 1] * 10)
            wait_for(lambda: server.stderr().count("read nothing for 2 s") == 8, 60,
                     "the server to cancel the 8 unread streams")
            for call in calls:  # reading now: the frames gRPC had buffered, then the status
                with pytest.raises(grpc.RpcError) as info:
                    for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "--stall-timeout" in info.value.details()
        assert grpc.StatusCode.DEADLINE_EXCEEDED not in FATAL_CODES  # the loader retries it
        grown = peak[0] - base
        assert grown > 100 * MiB, f"8 unread streams grew the worker by {grown / MiB:.0f} MiB"
        # glibc keeps freed frames unless trimmed: RSS falls back once the streams are gone
        wait_for(lambda: status_value(worker, "VmRSS") < base + grown / 4, 30,
                 f"RSS back near {base / MiB:.0f} MiB after a peak of {peak[0] / MiB:.0f} MiB "
                 f"(now {status_value(worker, 'VmRSS') / MiB:.0f} MiB)")
        assert_healthy(server)


def test_the_memory_budget_holds_with_many_unread_streams(folder: Path) -> None:
    """16 unread streams would pin 2 batches each (300 MB); --max-memory 40M bounds them,
    and every stream completes once they are all read."""
    with running_server({"photos": folder}, *FAST, "--max-memory", "40M",
                        "--stall-timeout", "0") as server:
        (worker,) = server.pids()
        warm_up(server.address)
        base = settled_rss(worker)
        with connect(server.address) as channel:
            calls = open_unread(channel, 16, [0, 1])
            held = settled_rss(worker) - base  # the worker has stopped: budget full
            with ThreadPoolExecutor(16) as pool:  # read them all at once
                got = list(pool.map(lambda call: len(list(wire.assemble(call))), calls))
        assert got == [2] * 16
        # the budget (40 MiB) + what gRPC buffers per stream before flow control stops it
        assert held < 150 * MiB, f"16 unread streams hold {held / MiB:.0f} MiB"


def test_a_flood_of_streams_is_refused_at_once_and_threads_stay_bounded(folder: Path) -> None:
    limit, flood = 8, 200
    request = stream_request(spec=BIG, batch_size=BATCH, batches=[0, 1] * 50)
    with running_server({"photos": folder}, *FAST, "--max-streams", str(limit)) as server:
        (worker,) = server.pids()
        with contextlib.ExitStack() as stack, peak_of(worker, "Threads") as threads:
            channels = [stack.enter_context(connect(server.address)) for _ in range(4)]
            stubs = [wire.AugmentStub(c) for c in channels]
            calls = [stubs[i % 4].StreamBatches(request, timeout=120) for i in range(flood)]

            def refused() -> list[grpc.Future]:
                return [c for c in calls
                        if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]

            wait_for(lambda: len(refused()) == flood - limit, 60, "the refusals")
            assert health_status(channels[0]) == SERVING  # answered during the flood
            assert sum(not c.done() for c in calls) == limit  # the admitted ones run on
            assert all("--max-streams" in c.details() for c in refused())
            for call in calls:
                call.cancel()
        # --max-streams + 16 spare gRPC threads + one shared pipeline's few threads; with a
        # pipeline (and a producer thread) per stream this was over 90
        assert threads[0] <= limit + 16 + 25, f"{threads[0]} threads"
        assert_healthy(server)


def test_refusals_are_logged_as_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """A flood is one log line every few seconds, not one per refused stream."""
    from augsvc.server.watchdog import REFUSALS_EVERY, Watchdog

    refused = [0]
    watchdog = Watchdog(60, idle=lambda: False, refused=lambda: refused[0])
    start = time.monotonic()
    with caplog.at_level("INFO", logger="augsvc.server"):
        refused[0] = 1500
        watchdog.check(start + REFUSALS_EVERY + 1)
        refused[0] = 1900
        watchdog.check(start + REFUSALS_EVERY + 2)  # too soon: counted in the next line
        watchdog.check(start + 2 * REFUSALS_EVERY + 2)
    lines = [r.getMessage() for r in caplog.records if "over --max-streams" in r.getMessage()]
    assert lines == ["refused 1500 stream(s) over --max-streams in the last 11 s",
                     "refused 400 stream(s) over --max-streams in the last 11 s"]


def test_calls_refused_before_their_handler_leave_every_slot_free(folder: Path) -> None:
    """With --max-streams 2: calls without the token and calls whose request does not
    parse are answered at once and hold no slot, not even for admission's PENDING_TTL
    (10 s): a valid stream right after them is admitted."""
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with running_server({"photos": folder}, *FAST, "--max-streams", "2",
                        env={"AUGSVC_TOKEN": TOKEN}) as server, \
            connect(server.address) as channel:
        raw = channel.unary_stream(wire.STREAM_BATCHES_METHOD, request_serializer=None,
                                   response_deserializer=None)
        for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                               (auth, grpc.StatusCode.INVALID_ARGUMENT)):
            for _ in range(3):
                error = rpc_error(lambda md=metadata: list(raw(b"\xff" * 9, metadata=md,
                                                              timeout=10)))
                assert error.code() == code, error.details()
        started = time.monotonic()
        batches = fetch(channel, stream_request(batch_size=4), auth)
        assert len(batches) == 1 and time.monotonic() - started < 5
