"""SIGTERM against a real `augsvc serve`, on a timeline: health turns NOT_SERVING first,
then new streams are refused with UNAVAILABLE (which loaders retry elsewhere), a running
stream read at its client's pace finishes, one whose client reads nothing is handed back
(cancelled, retryable) when --grace runs out, and the server exits 0 within --grace and
the supervisor's margin. deploy/k8s's probes are checked against the same order in
tests/test_deploy_manifests.py.
"""

from __future__ import annotations

import itertools
import re
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2
from serverproc import running_server
from test_metrics import scrape, value
from test_server import FAST, connect, fetch, health_status, stream_request

from augsvc import wire
from augsvc.core.spec import AugmentSpec
from augsvc.server.supervisor import STOP_MARGIN
from augsvc.wire._proto import augment_pb2 as pb

GRACE = 4.0
POLL = 0.05
RETRYABLE = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
STATUS = health_pb2.HealthCheckResponse.ServingStatus.Name


@dataclass
class Probe:
    """One poll: a new stream's fate, then health (same connection, so same worker)."""

    t: float
    stream: str  # "ok", "refused" (UNAVAILABLE, shutting down, marked to retry) or "gone: CODE"
    health: str  # "SERVING", "NOT_SERVING" or "gone"


def _stream(channel: grpc.Channel) -> str:
    try:
        fetch(channel, stream_request())
    except grpc.RpcError as err:
        retry = dict(err.trailing_metadata() or ()).get(wire.RETRY_KEY)
        if err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details():
            return "refused" if retry == "draining" else f"refused without {wire.RETRY_KEY}"
        return f"gone: {err.code().name}"
    return "ok"


def _health(channel: grpc.Channel) -> str:
    try:
        return STATUS(health_status(channel))
    except grpc.RpcError:
        return "gone"


def _poll(address: str, probes: list[Probe], stop: threading.Event) -> None:
    with connect(address) as channel:
        while not stop.is_set():
            t = time.monotonic()
            probes.append(Probe(t, _stream(channel), _health(channel)))
            stop.wait(POLL)


def _phases(values: list[str], order: tuple[str, ...]) -> bool:
    """Whether `values` go through `order` without going back (each may be absent)."""
    ranks = [next(i for i, o in enumerate(order) if v.startswith(o)) for v in values]
    return ranks == sorted(ranks)


def test_sigterm_turns_health_first_refuses_then_drains_within_grace(jpeg_folder) -> None:
    big = AugmentSpec(size=(224, 224), hsv=False, pca=False)
    read = stream_request(spec=big, batch_size=4, batches=[0, 1, 2] * 4)  # ~7 MB, read
    unread = stream_request(spec=big, batch_size=4, batches=[0, 1, 2] * 20)  # ~36 MB
    probes: list[Probe] = []
    stop = threading.Event()
    with running_server({"photos": jpeg_folder}, *FAST, "--grace", str(GRACE), "--prefetch",
                        "1", "--metrics-port", "0", "--log-level", "debug") as server, \
            connect(server.address) as a_channel, connect(server.address) as b_channel:
        poller = threading.Thread(target=_poll, args=(server.address, probes, stop))
        a = wire.AugmentStub(a_channel).StreamBatches(read, timeout=60)
        b = wire.AugmentStub(b_channel).StreamBatches(unread, timeout=60)
        assembler = wire.BatchAssembler()
        received = []
        for frame in a:  # A: its first batch now, the rest after the signal
            if (batch := assembler.feed(frame)) is not None:
                received.append(batch.header.batch_index)
                break
        assert isinstance(next(b), pb.BatchHeader)  # B: running, its client reads no more
        poller.start()
        while len(probes) < 3:
            time.sleep(POLL)
        t_signal = time.monotonic()
        server.send_signal(signal.SIGTERM)
        for frame in a:
            if (batch := assembler.feed(frame)) is not None:
                received.append(batch.header.batch_index)
        t_a = time.monotonic()
        while not any(p.stream == "refused" for p in probes):
            assert time.monotonic() - t_signal < GRACE, "no stream refused while draining"
            time.sleep(POLL)
        refused_before = sum(p.stream == "refused" for p in probes)
        draining = scrape(server)  # the metrics process serves until the workers are gone
        refused_after = sum(p.stream == "refused" for p in probes)
        code = server.proc.wait(GRACE + STOP_MARGIN + 10)  # once B is handed back
        t_exit = time.monotonic()
        log = server.stderr()
        stop.set()
        poller.join()
        with pytest.raises(grpc.RpcError) as ended:  # what reached B's client, then its end
            for _ in b:
                pass

    runs = [list(run) for _, run in itertools.groupby(probes, lambda p: (p.stream, p.health))]
    timeline = [f"{run[0].t - t_signal:+7.3f} s  {len(run):3d} probe(s) to "
                f"{run[-1].t - t_signal:+.3f} s: stream {run[0].stream}, health {run[0].health}"
                for run in runs]
    timeline += [f"{t - t_signal:+7.3f} s  {what}" for t, what in (
        (t_a, f"running stream A done: {len(received)} batches"),
        (t_exit, f"server exited {code}; unread stream B: {ended.value.code().name}"))]
    print("\n".join(["SIGTERM at +0.000 s", *timeline]))

    before = [p for p in probes if p.t < t_signal]
    assert before and all(p.stream == "ok" and p.health == "SERVING" for p in before)
    assert _phases([p.health for p in probes], ("SERVING", "NOT_SERVING", "gone"))
    assert _phases([p.stream for p in probes], ("ok", "refused", "gone"))
    assert not [p for p in probes if p.stream.startswith("refused without")]  # all retryable
    # the order: a stream is refused only once health (asked right after) says NOT_SERVING,
    # or is gone (the server can exit between the two calls of the last probe); never while
    # it still says SERVING (the phases above put "gone" after NOT_SERVING)
    assert all(p.health in ("NOT_SERVING", "gone") for p in probes if p.stream == "refused")
    assert any(p.health == "NOT_SERVING" for p in probes if p.stream == "refused")
    first_down = min(p.t for p in probes if p.health == "NOT_SERVING")
    assert first_down - t_signal < 2.0
    assert received == [0, 1, 2] * 4 and t_a < t_signal + GRACE  # A finished, in full
    # B ran until the grace period was over, then was handed back (a retryable status)
    assert code == 0 and GRACE <= t_exit - t_signal < GRACE + STOP_MARGIN
    assert ended.value.code() in RETRYABLE
    assert re.search(r"stream from \S+ cancelled: photos, \d+ of 60 batch", log), log
    # health answers NOT_SERVING (not a dead port) for as long as the drain lasts: here
    # the whole grace period, B running to its end
    assert all(p.health == "NOT_SERVING" for p in probes
               if first_down <= p.t < t_signal + GRACE - 0.2)
    refused = value(draining, "augsvc_refused_streams_total", reason="draining")
    assert refused_before <= refused <= refused_after
    assert value(draining, "augsvc_active_streams") == 1  # B, until the grace runs out
    assert "grace period over: cancelling 1 running stream(s)" in log
