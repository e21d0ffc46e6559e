"""`augsvc serve --metrics-port`: real servers on loopback, scraped over HTTP after known
work, every count checked against what the client received (raw frames, no loader).

Two workers share the port, so the sums prove the multiprocess aggregation; a worker
killed and replaced keeps its counts in the sums and leaves none of its gauges.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverproc import REPO_ROOT, ServerProcess, running_server
from support import requires_gpu
from test_server import (
    FAST,
    SERVING,
    SMALL,
    connect,
    fetch,
    health_status,
    rpc_error,
    stream_request,
    wait_for,
)

from augsvc import wire
from augsvc.core.spec import AugmentSpec
from augsvc.engine.dataset import check_encoded
from augsvc.engine.files import FileRefused, read_file
from augsvc.server import ServerConfig, exporter
from augsvc.server.metrics import (
    BATCH_OUTCOMES,
    REFUSAL_REASONS,
    SAMPLE_REASONS,
    STAGES,
    sample_reason,
)
from augsvc.server.nvml import GpuMemoryCollector, Nvml
from augsvc.wire._proto import augment_pb2 as pb

MiB = 1 << 20
EPOCH, BATCH = 12, 4  # jpeg_folder's images; 3 batches an epoch
IMAGE_BYTES = 32 * 32 * 3  # test_server.SMALL: 32x32 uint8 RGB
# one line per stream at --log-level debug (augsvc.server.logs)
DONE_LINE = re.compile(r"augsvc\[(\d+)\] DEBUG augsvc\.server\.requests: stream from \S+ done")

Samples = dict[tuple[str, frozenset], float]


def scrape(server: ServerProcess) -> Samples:
    """Every sample of GET /metrics, keyed by (name, labels)."""
    url = f"http://{server.host}:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def settled(server: ServerProcess, quiet_s: float = 0.5) -> Samples | None:
    """A scrape that another one `quiet_s` later equals (no batch still in flight), or None."""
    first = scrape(server)
    time.sleep(quiet_s)
    return first if scrape(server) == first else None


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def raw_stream(channel: grpc.Channel, request: pb.StreamBatchesRequest) -> list[bytes]:
    """The serialized frames of a StreamBatches call, as they came off the wire."""
    call = channel.unary_stream(wire.STREAM_BATCHES_METHOD,
                                request_serializer=pb.StreamBatchesRequest.SerializeToString)
    return list(call(request, timeout=60))


def worker_pids(server: ServerProcess) -> list[int]:
    """The workers (the parent's children but its metrics process)."""
    return [pid for pid in server.pids()
            if Path(f"/proc/{pid}/comm").read_text().strip() != exporter.NAME]


def done_by_pid(server: ServerProcess) -> list[int]:
    return [int(pid) for pid in DONE_LINE.findall(server.stderr())]


def test_an_epoch_is_counted_exactly_across_two_workers(jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST, "--metrics-port", "0",
                        "--max-memory", "64M", "--log-level", "debug", workers=2) as server:
        pids = worker_pids(server)
        assert len(pids) == 2 and len(server.pids()) == 3
        rounds, images, payload, wire_bytes = 0, 0, 0, 0
        while set(done_by_pid(server)) != set(pids):  # an epoch a connection, until both served
            assert rounds < 24, f"24 connections all reached one worker: {done_by_pid(server)}"
            with connect(server.address) as channel:
                raw = raw_stream(channel, stream_request(batch_size=BATCH, batches=[]))
            batches = list(wire.assemble(map(wire.decode_frame, raw)))
            assert [b.header.batch_index for b in batches] == [0, 1, 2]
            rounds += 1
            images += sum(b.array.shape[0] for b in batches)
            payload += sum(b.array.nbytes for b in batches)
            wire_bytes += sum(map(len, raw))
            wait_for(lambda n=rounds: len(done_by_pid(server)) == n, 10, "the stream's log line")
        assert images == rounds * EPOCH and payload == images * IMAGE_BYTES < wire_bytes

        samples = wait_for(lambda: (s := scrape(server)) and value(
            s, "augsvc_prefetched_bytes") == 0 and s, 10, "every batch's memory given back")
        assert value(samples, "augsvc_sent_images_total", dataset="photos") == images
        assert value(samples, "augsvc_sent_bytes_total", dataset="photos") == wire_bytes
        assert value(samples, "augsvc_batches_total", outcome="sent") == rounds * 3
        assert value(samples, "augsvc_batches_total", outcome="failed") == 0
        assert value(samples, "augsvc_batches_total", outcome="unsent") == 0
        assert value(samples, "augsvc_streams_total", outcome="done") == rounds
        for stage in STAGES:
            assert value(samples, "augsvc_batch_seconds_count", stage=stage) == rounds * 3
            assert value(samples, "augsvc_batch_seconds_sum", stage=stage) > 0
        for reason in REFUSAL_REASONS:
            assert value(samples, "augsvc_refused_streams_total", reason=reason) == 0
        assert value(samples, "augsvc_active_streams") == 0
        assert value(samples, "augsvc_pipelines") == 2  # one per worker, kept for reuse
        assert value(samples, "augsvc_pipelines_built_total") == 2
        assert value(samples, "augsvc_prefetch_limit_bytes") == 2 * 64 * MiB
        assert value(samples, "augsvc_workers") == 2
        assert value(samples, "augsvc_worker_restarts_total") == 0
        assert not any(name.startswith("augsvc_gpu_") for name, _ in samples)  # CPU server

        os.kill(pids[0], signal.SIGKILL)
        (new,) = wait_for(lambda: set(worker_pids(server)) - {pids[1]} - {pids[0]}, 30,
                          "a replacement worker")
        wait_for(lambda: f"(pid {new})" in server.stderr(), 30, "the replacement listening")
        replaced = scrape(server)
        assert value(replaced, "augsvc_worker_restarts_total") == 1
        # the dead worker's counts stay in the sums; its gauges left them
        assert value(replaced, "augsvc_sent_images_total", dataset="photos") == images
        assert value(replaced, "augsvc_batches_total", outcome="sent") == rounds * 3
        assert value(replaced, "augsvc_prefetch_limit_bytes") == 2 * 64 * MiB
        assert value(replaced, "augsvc_pipelines") == 1  # the new worker has built none
        assert value(replaced, "augsvc_workers") == 2
        assert server.stop() == 0


def test_refusals_and_unsent_batches_are_counted(jpeg_folder: Path) -> None:
    big = AugmentSpec(size=(224, 224), hsv=False, pca=False)
    held = stream_request(spec=big, batch_size=BATCH, batches=[0, 1, 2] * 10)
    with running_server({"photos": jpeg_folder}, *FAST, "--metrics-port", "0",
                        "--max-streams", "1", "--prefetch", "1") as server, \
            connect(server.address) as channel:
        for request, code in ((stream_request(dataset="nope"), grpc.StatusCode.NOT_FOUND),
                              (stream_request(batch_size=5000),
                               grpc.StatusCode.RESOURCE_EXHAUSTED),
                              (stream_request(batch_size=0), grpc.StatusCode.INVALID_ARGUMENT)):
            assert rpc_error(lambda r=request: fetch(channel, r)).code() == code
        frames = wire.AugmentStub(channel).StreamBatches(held, timeout=60)
        assert isinstance(next(frames), pb.BatchHeader)  # it runs, and holds the only slot
        over = rpc_error(lambda: fetch(channel, stream_request()))
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        running = scrape(server)
        assert value(running, "augsvc_active_streams") == 1
        assert value(running, "augsvc_prefetched_bytes") > 0  # made, waiting for the reader
        expected = {"max_streams": 1, "unknown_dataset": 1, "batch_too_large": 1, "invalid": 1}
        for reason in REFUSAL_REASONS:
            assert value(running, "augsvc_refused_streams_total",
                         reason=reason) == expected.get(reason, 0), reason

        frames.cancel()
        # settled: a batch DALI was still making when the call ended is counted too
        ended = wait_for(lambda: (s := settled(server)) and value(
            s, "augsvc_streams_total", outcome="cancelled") == 1 and value(
            s, "augsvc_prefetched_bytes") == 0 and s, 10, "the cancelled stream's end")
        counts = {o: value(ended, "augsvc_batches_total", outcome=o) for o in BATCH_OUTCOMES}
        assert counts["failed"] == 0 and counts["sent"] + counts["unsent"] == 30
        assert counts["unsent"] > 0  # the client read one frame: gRPC holds a few, not 30
        assert value(ended, "augsvc_sent_images_total", dataset="photos") == \
            BATCH * counts["sent"]
        assert value(ended, "augsvc_active_streams") == 0
        assert value(ended, "augsvc_streams_total", outcome="done") == 0

        (metrics,) = set(server.pids()) - set(worker_pids(server))
        os.kill(metrics, signal.SIGKILL)  # a new metrics process serves the same sums
        again = wait_for(lambda: set(server.pids()) - set(worker_pids(server)) - {metrics},
                         10, "a new metrics process")
        assert scrape(server) == ended and again
        assert "the metrics process exited with code -9; starting a new one" in server.stderr()


def test_substituted_and_dropped_samples_are_counted_by_reason(corrupt_folder: Path) -> None:
    """An epoch of the corrupt folder with each policy: the counts by reason equal what the
    batch headers reported; --health-port beside --metrics-port: both on the serving line."""
    with running_server({"corrupt": corrupt_folder}, *FAST, "--metrics-port", "0",
                        "--health-port", "0") as server:
        assert None not in (server.health_port, server.metrics_port)
        assert len({server.port, server.health_port, server.metrics_port}) == 3
        with connect(f"{server.host}:{server.health_port}") as channel:
            assert health_status(channel) == SERVING
        reported = {"substituted": [], "dropped": []}
        with connect(server.address) as channel:
            for policy, field in (("substitute", "substituted"), ("drop", "dropped")):
                spec = SMALL.replace(corrupt=policy)
                for batch in fetch(channel, stream_request("corrupt", spec, batch_size=4,
                                                           batches=[])):
                    reported[field] += [sample_reason(s.reason)
                                        for s in getattr(batch.header, field)]
        assert sorted(reported["substituted"]) == sorted(reported["dropped"]) == [
            "invalid", "undecodable"]  # a truncated file, one DALI cannot decode
        samples = wait_for(lambda: (s := scrape(server)) and value(
            s, "augsvc_streams_total", outcome="done") == 2 and s, 10, "both streams' end")
        for field in reported:
            for reason in SAMPLE_REASONS:
                assert value(samples, f"augsvc_{field}_samples_total", reason=reason) == \
                    reported[field].count(reason), (field, reason)
        assert server.stop() == 0


def test_sample_reasons_label_what_the_engine_says(tmp_path: Path) -> None:
    """The engine's own reasons, from real files, get their labels."""
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "elsewhere.jpg").write_bytes(b"x" * 10)
    (root / "link.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "grown.jpg").write_bytes(b"x" * 10)
    labels = {}
    for name, size in (("link.jpg", 10), ("pipe.jpg", 0), ("grown.jpg", 5), ("gone.jpg", 1)):
        with pytest.raises(FileRefused) as info:
            read_file(str(root / name), size, str(root))
        labels[name] = sample_reason(str(info.value))
    assert labels == {"link.jpg": "refused", "pipe.jpg": "refused", "grown.jpg": "refused",
                      "gone.jpg": "unreadable"}
    assert {sample_reason(check_encoded(raw)) for raw in (b"", b"\xff\xd8\xff", b"GIF8")} == {
        "invalid"}
    assert set(labels.values()) < set(SAMPLE_REASONS)


def test_gpu_memory_is_left_out_where_nvml_cannot_be_read(jpeg_folder: Path) -> None:
    """--device gpu without NVML (or without these GPUs): no GPU series, one warning."""
    with running_server({"photos": jpeg_folder}, *FAST, "--metrics-port", "0", "--device",
                        "gpu", env={"CUDA_VISIBLE_DEVICES": "7"}) as server:
        samples = scrape(server)
        assert value(samples, "augsvc_workers") == 1
        assert not any(name.startswith("augsvc_gpu_") for name, _ in samples)
        scrape(server)
        log = server.stderr()
        assert log.count("no GPU memory in /metrics: ") == 1, log
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/", timeout=10)


def test_metrics_port_in_use_or_clashing_is_a_clear_error(jpeg_folder: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            [sys.executable, "-m", "augsvc", "serve", "--dataset", f"photos={jpeg_folder}",
             "--port", "0", "--device", "cpu", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert f"cannot listen on 127.0.0.1:{port} (--metrics-port)" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match="metrics port must differ from the port"):
        ServerConfig(datasets={"a": Path("b")}, port=5000, metrics_port=5000).validate()
    with pytest.raises(ValueError, match=r"metrics port must be in \[0, 65535\]"):
        ServerConfig(datasets={"a": Path("b")}, metrics_port=-1).validate()


def test_nvml_collector_without_the_library_yields_nothing(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    collector = GpuMemoryCollector(["0"], library="libnvidia-ml-not-here.so.1")
    assert list(collector.collect()) == [] and list(collector.collect()) == []
    assert [r.getMessage() for r in caplog.records] == [
        "no GPU memory in /metrics: cannot load libnvidia-ml-not-here.so.1: "
        "libnvidia-ml-not-here.so.1: cannot open shared object file: No such file or directory"]


@requires_gpu
def test_nvml_reads_what_nvidia_smi_shows() -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("needs nvidia-smi beside the driver")
    out = subprocess.run([smi, "--query-gpu=index,uuid,memory.total",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    nvml = Nvml()
    for line in out.strip().splitlines():
        index, uuid, total_mib = (field.strip() for field in line.split(","))
        handle = nvml.handle(index)
        assert nvml.uuid(handle) == uuid and nvml.uuid(nvml.handle(uuid)) == uuid
        used, total = nvml.memory(handle)
        assert abs(total / MiB - int(total_mib)) < 1 and 0 < used <= total
    used_family, total_family = GpuMemoryCollector(["0"]).collect()
    (sample,) = used_family.samples
    assert sample.labels["gpu"] == "0" and sample.labels["uuid"].startswith("GPU-")
    assert 0 < sample.value <= total_family.samples[0].value
