"""The gRPC server end to end: real `augsvc serve` processes on a loopback ephemeral
port, real JPEGs, raw gRPC stubs and the wire decoder (not the high-level client).

Small images, small batches and one DALI thread per pipeline keep the module to
well under a minute on two cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from certs import make_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from serverproc import REPO_ROOT, ServerProcess, running_server

from augsvc import wire
from augsvc.client import AugmentLoader
from augsvc.core.spec import AugmentSpec
from augsvc.engine.dataset import open_dataset
from augsvc.server import ServerConfig
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST = ("--dali-threads", "1", "--io-threads", "2")
SMALL = AugmentSpec(size=(32, 32), hsv=False, pca=False)
TOKEN = "s3cret-token-for-tests"


# ---------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def connect(address: str, credentials: grpc.ChannelCredentials | None = None,
            ) -> Iterator[grpc.Channel]:
    """A channel with its own connection (distinct args: grpc may share otherwise)."""
    options = wire.channel_options(own_connection=True)
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        yield channel


def augsvc_health(*args: str) -> subprocess.CompletedProcess:
    """`augsvc health ARGS` as a probe runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "augsvc", "health", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def stream_request(dataset: str = "photos", spec: AugmentSpec = SMALL,
                   **fields: object) -> pb.StreamBatchesRequest:
    values: dict[str, object] = {"seed": 7, "epoch": 0, "batch_size": 2, "batches": [0]}
    values.update(fields)
    return pb.StreamBatchesRequest(dataset=dataset, spec=spec_to_proto(spec), **values)


def fetch(channel: grpc.Channel, request: pb.StreamBatchesRequest,
          metadata: tuple[tuple[str, str], ...] | None = None) -> list[wire.AssembledBatch]:
    frames = wire.AugmentStub(channel).StreamBatches(request, metadata=metadata, timeout=60)
    return list(wire.assemble(frames))


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_healthy(server: ServerProcess,
                   credentials: grpc.ChannelCredentials | None = None,
                   metadata: tuple[tuple[str, str], ...] | None = None) -> None:
    """Health SERVING (overall and the service) and a small stream succeeds."""
    with connect(server.address, credentials) as channel:
        assert health_status(channel) == SERVING
        assert health_status(channel, wire.SERVICE_NAME) == SERVING
        (batch,) = fetch(channel, stream_request(), metadata)
        assert batch.array.shape == (2, 32, 32, 3)


def established_by_pid(port: int, pids: list[int]) -> dict[int, int]:
    """How many established TCP connections to local `port` each of `pids` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on v4-mapped IPv6
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local_port = int(cols[1].split(":")[1], 16)
                if local_port == port and cols[3] == "01":  # ESTABLISHED
                    inodes.add(cols[9])
    counts = {}
    for pid in pids:
        links = []
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        counts[pid] = sum(link[8:-1] in inodes for link in links if link.startswith("socket:["))
    return counts


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def server(jpeg_folder: Path, corrupt_folder: Path) -> Iterator[ServerProcess]:
    with running_server({"photos": jpeg_folder, "corrupt": corrupt_folder}, *FAST,
                        "--max-batch-size", "16") as proc:
        yield proc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, via openssl."""
    return make_certs(tmp_path_factory.mktemp("certs"))


# ---------------------------------------------------------------------------
# catalog, health, reflection


def test_list_and_get_dataset(server: ServerProcess, jpeg_folder: Path) -> None:
    index = open_dataset(jpeg_folder)
    with connect(server.address) as channel:
        stub = wire.AugmentStub(channel)
        listed = stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets
        assert [(d.name, d.num_samples, d.num_classes) for d in listed] == [
            ("photos", 12, 3), ("corrupt", 12, 3)]
        info = stub.GetDataset(pb.GetDatasetRequest(name="photos"), timeout=10)
    assert info.name == "photos" and info.num_samples == len(index) == 12
    assert list(info.classes) == list(index.classes) == ["class_00", "class_01", "class_02"]
    assert info.num_rejected == 0
    assert list(info.stats_sources) == ["imagenet"]  # no `augsvc stats` run here
    assert info.stats.source == "imagenet"
    np.testing.assert_allclose(info.stats.mean, [0.485, 0.456, 0.406])
    eigvecs = np.array(info.stats.eigvecs).reshape(3, 3)
    np.testing.assert_allclose(eigvecs[:, 0], [-0.5675, -0.5808, -0.5836])
    assert info.stats.eigvals[0] == pytest.approx(0.2175)


def test_health_serving_and_reflection(server: ServerProcess) -> None:
    with connect(server.address) as channel:
        assert health_status(channel) == SERVING
        assert health_status(channel, wire.SERVICE_NAME) == SERVING
        error = rpc_error(lambda: health_status(channel, "no.such.Service"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert {wire.SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)
        proto = database.FindFileContainingSymbol(wire.SERVICE_NAME)
        assert "StreamBatches" in [m.name for s in proto.service for m in s.method]


# ---------------------------------------------------------------------------
# StreamBatches


@pytest.mark.parametrize("spec", [
    AugmentSpec(size=(96, 128), hsv=False, pca=False, p_vflip=0.5),
    AugmentSpec(size=(40, 56), layout="NCHW", dtype="float16", normalize=True),
], ids=["uint8-nocolour", "float16-nchw-colour"])
def test_stream_equals_in_process_engine(server: ServerProcess, jpeg_folder: Path,
                                         spec: AugmentSpec) -> None:
    from augsvc.core.sampling import EpochPlan
    from augsvc.engine.augmenter import Augmenter
    from augsvc.engine.statistics import load_stats

    seed, epoch, batch_size, rank, world = 1234, 3, 3, 1, 2
    request = stream_request(spec=spec, seed=seed, epoch=epoch, batch_size=batch_size,
                             rank=rank, world_size=world, batches=[1, 0], chunk_bytes=65536)
    with connect(server.address) as channel:
        frames = list(wire.AugmentStub(channel).StreamBatches(request, timeout=60))
    batches = list(wire.assemble(frames))
    assert [b.header.batch_index for b in batches] == [1, 0]

    index = open_dataset(jpeg_folder)
    plan = EpochPlan(len(index), batch_size, seed, epoch, rank, world, labels=index.labels)
    engine = Augmenter(index, spec, load_stats(index, "imagenet"), max_batch_size=batch_size,
                       num_threads=1)
    try:
        for got in batches:
            want = engine.run_batch(seed, epoch, plan.batch(got.header.batch_index))
            h, w = spec.size
            assert tuple(got.header.shape) == ((3, 3, h, w) if spec.layout == "NCHW"
                                               else (3, h, w, 3))
            assert (got.header.dtype, got.header.layout) == (spec.dtype, spec.layout)
            assert got.array.dtype == want.images.dtype and got.array.shape == want.images.shape
            assert got.array.tobytes() == want.images.tobytes()
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_array_equal(got.sample_ids, want.sample_ids)
            np.testing.assert_array_equal(got.draw_ids, want.draw_ids)
            assert not got.header.dropped
    finally:
        engine.close()
    if spec.size == (96, 128):  # 110 KiB of uint8 in 64 KiB chunks
        assert [b.header.num_chunks for b in batches] == [2, 2]


def test_corrupt_images_are_dropped_and_the_stream_goes_on(
        server: ServerProcess, corrupt_folder: Path) -> None:
    index = open_dataset(corrupt_folder)
    bad = {index.paths.index(str(corrupt_folder / "class_01" / "img_0002.jpg")),
           index.paths.index(str(corrupt_folder / "class_02" / "img_0001.jpg"))}
    with connect(server.address) as channel:
        batches = fetch(channel, stream_request("corrupt", SMALL.replace(corrupt="drop"),
                                                batch_size=4, batches=[]))
    assert [b.header.batch_index for b in batches] == [0, 1, 2]
    dropped = [d for b in batches for d in b.header.dropped]
    assert {d.sample_id for d in dropped} == bad
    for d in dropped:
        assert d.path == index.relpath(d.sample_id) and d.reason  # relative to the root
    assert sum(b.array.shape[0] for b in batches) == len(index) - 2
    for b in batches:
        assert b.array.shape[0] == 4 - len(b.header.dropped) == len(b.labels)
        assert not bad & set(b.sample_ids.tolist())
    assert_healthy(server)


def _get_dataset(**fields: object) -> Callable[[grpc.Channel], object]:
    return lambda ch: wire.AugmentStub(ch).GetDataset(pb.GetDatasetRequest(**fields), timeout=10)


def _stream(spec: AugmentSpec = SMALL, **fields: object) -> Callable[[grpc.Channel], object]:
    return lambda ch: fetch(ch, stream_request(fields.pop("dataset", "photos"), spec, **fields))


def _raw_spec(**fields: object) -> Callable[[grpc.Channel], object]:
    """A request whose spec proto has an invalid value (AugmentSpec would refuse it)."""
    def call(ch: grpc.Channel) -> object:
        request = stream_request()
        for name, value in fields.items():
            if name == "size":
                request.spec.size.CopyFrom(pb.Size(height=value[0], width=value[1]))
            else:
                setattr(request.spec, name, value)
        return fetch(ch, request)
    return call


ERRORS = {
    "unknown-dataset-get": (_get_dataset(name="nope"), grpc.StatusCode.NOT_FOUND,
                            ["'nope'", "photos, corrupt"]),
    "unknown-dataset-stream": (_stream(dataset="nope"), grpc.StatusCode.NOT_FOUND,
                               ["StreamBatchesRequest.dataset", "photos, corrupt"]),
    "spec-size": (_raw_spec(size=(0, 32)), grpc.StatusCode.INVALID_ARGUMENT,
                  ["AugmentSpec.size"]),
    "spec-crop": (_raw_spec(crop="zoom"), grpc.StatusCode.INVALID_ARGUMENT,
                  ["AugmentSpec.crop", "random_resized_crop"]),
    "spec-sigma": (_raw_spec(pca_sigma=-1.0), grpc.StatusCode.INVALID_ARGUMENT,
                   ["AugmentSpec.pca_sigma"]),
    "batch-too-big": (_stream(batch_size=17), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      ["batch_size", "16"]),
    "batch-size-zero": (_stream(batch_size=0), grpc.StatusCode.INVALID_ARGUMENT,
                        ["batch_size"]),
    "rank": (_stream(rank=2, world_size=2), grpc.StatusCode.INVALID_ARGUMENT, ["rank"]),
    "batch-index": (_stream(batches=[0, 6]), grpc.StatusCode.INVALID_ARGUMENT,
                    ["batches", "batch 6", "0..5"]),
    "tail": (_stream(tail="wrap"), grpc.StatusCode.INVALID_ARGUMENT, ["tail"]),
    "too-few-samples": (_stream(batch_size=13), grpc.StatusCode.INVALID_ARGUMENT, ["pad"]),
    "stats-stream": (_stream(spec=SMALL.replace(stats="dataset")),
                     grpc.StatusCode.FAILED_PRECONDITION, ["AugmentSpec.stats", "augsvc stats"]),
    "stats-get": (_get_dataset(name="photos", stats="dataset"), grpc.StatusCode.NOT_FOUND,
                  ["augsvc stats"]),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_error_status_and_server_stays_healthy(server: ServerProcess, case: str) -> None:
    call, code, fragments = ERRORS[case]
    with connect(server.address) as channel:
        error = rpc_error(lambda: call(channel))
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details()
    assert_healthy(server)


def test_unexpected_error_is_internal_and_serving_goes_on(
        jpeg_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process server (`start_server`): an exception in a stream is INTERNAL."""
    from augsvc.server import ServerConfig, start_server
    from augsvc.server.servicer import PipelinePool

    config = ServerConfig(datasets={"photos": jpeg_folder}, port=0, device="cpu",
                          dali_threads=1, io_threads=2)
    server = start_server(config)
    original = PipelinePool._build

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("simulated pipeline failure")

    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            monkeypatch.setattr(PipelinePool, "_build", broken)
            error = rpc_error(lambda: fetch(channel, stream_request()))
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "simulated pipeline failure" in error.details()
            monkeypatch.setattr(PipelinePool, "_build", original)
            assert health_status(channel, wire.SERVICE_NAME) == SERVING
            (batch,) = fetch(channel, stream_request())
            assert batch.array.shape == (2, 32, 32, 3)
    finally:
        server.shutdown(grace=1)
    assert server.wait(5)


def test_pipeline_pool_shares_and_keeps_pipelines(jpeg_folder: Path) -> None:
    """Streams with one key share one pipeline; idle ones are kept up to max_idle."""
    from augsvc.core.sampling import EpochPlan
    from augsvc.server import load_catalog
    from augsvc.server.batchcache import BatchCache
    from augsvc.server.producer import Job
    from augsvc.server.servicer import PipelinePool
    from augsvc.wire.convert import StreamRequest

    entry = load_catalog({"photos": jpeg_folder})["photos"]
    pool = PipelinePool(device="cpu", device_id=0, dali_threads=1, io_threads=1, max_idle=1,
                        max_memory=1 << 30, depth=2, cache=BatchCache(0))

    def job(spec: AugmentSpec, batch_size: int) -> Job:
        request = StreamRequest.from_proto(stream_request(spec=spec, batch_size=batch_size))
        plan = EpochPlan(len(entry.index), batch_size, 7, 0, 0, 1, "drop_last",
                         entry.index.labels)
        return Job(request, entry, entry.stats["imagenet"], "imagenet", plan, (0,), 1 << 20)

    try:
        first, second = pool.attach(job(SMALL, 3), [0]), pool.attach(job(SMALL, 4), [0])
        assert first.scheduler is second.scheduler  # same power-of-two bucket: shared
        assert first.scheduler.key == ("photos", SMALL, "cpu", 4)
        for work in (first, second):
            made = work.take()
            assert made.frames and made.charge.nbytes == sum(map(len, made.frames))
            work.sent(made.charge)
            work.close()
        assert pool.built == 1 and pool.budget.used == 0
        other = pool.attach(job(SMALL.replace(p_hflip=0.0), 4), [0])
        assert other.scheduler is not first.scheduler
        other.take()
        other.close()  # two idle now, max_idle=1: the older one is closed
        assert [s.key for s in pool.schedulers()] == [other.scheduler.key]
        again = pool.attach(job(SMALL.replace(p_hflip=0.0), 4), [0])
        assert again.scheduler is other.scheduler and pool.built == 2
        again.close()
    finally:
        pool.close()
        pool.join(10)


# ---------------------------------------------------------------------------
# limits, authentication, TLS


def test_too_many_streams_is_resource_exhausted(jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST, "--max-streams", "1") as server, \
            connect(server.address) as channel:
        stub = wire.AugmentStub(channel)
        first = stub.StreamBatches(stream_request(batches=list(range(6)) * 40), timeout=60)
        assert isinstance(next(first), pb.BatchHeader)  # the first stream is running
        error = rpc_error(lambda: fetch(channel, stream_request()))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in error.details()
        first.cancel()
        # the slot frees when the server sees the cancellation
        wait_for(lambda: _stream_ok(channel), 10, "a stream after the cancel")
        # not assert_healthy: its stream could race the slot of the one just finished,
        # which frees when the server sees that call end, a moment after the client does
        assert health_status(channel) == SERVING
        assert health_status(channel, wire.SERVICE_NAME) == SERVING
        # Ctrl-C in a terminal signals the whole process group: a clean exit, no tracebacks
        server.send_signal(signal.SIGINT, group=True)
        assert server.proc.wait(30) == 0
        assert "Traceback" not in server.stderr()


def _stream_ok(channel: grpc.Channel) -> bool:
    try:
        fetch(channel, stream_request())
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


def test_bearer_token(jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST, env={"AUGSVC_TOKEN": TOKEN}) as server, \
            connect(server.address) as channel:
        stub = wire.AugmentStub(channel)
        list_datasets = pb.ListDatasetsRequest()
        for metadata in (None, (("authorization", "Bearer wrong-token"),),
                         (("authorization", TOKEN),)):
            error = rpc_error(lambda md=metadata: stub.ListDatasets(list_datasets, metadata=md,
                                                                    timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization" in error.details()
            error = rpc_error(lambda md=metadata: fetch(channel, stream_request(), md))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.ListDatasets(list_datasets, metadata=good, timeout=10).datasets
        assert health_status(channel) == SERVING  # probes need no token
        assert_healthy(server, metadata=good)
        assert TOKEN not in server.stderr()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls(jpeg_folder: Path, certs: dict[str, bytes], mutual: bool) -> None:
    d = Path(certs["dir"].decode())
    args = ["--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key")]
    if mutual:
        args += ["--tls-client-ca", str(d / "ca.pem")]
    with_client_cert = grpc.ssl_channel_credentials(
        certs["ca.pem"], private_key=certs["client.key"], certificate_chain=certs["client.pem"])
    without_client_cert = grpc.ssl_channel_credentials(certs["ca.pem"])
    with running_server({"photos": jpeg_folder}, *FAST, *args) as server:
        with connect(server.address) as plaintext:
            error = rpc_error(lambda: health_status(plaintext))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        with connect(server.address, without_client_cert) as channel:
            if mutual:
                error = rpc_error(lambda: health_status(channel))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert health_status(channel) == SERVING
        assert_healthy(server, with_client_cert)
        # the high-level loader over TLS, with the client certificate when required
        client_cert = (certs["client.pem"], certs["client.key"]) if mutual else None
        with AugmentLoader(server.address, "photos", SMALL, batch_size=2,
                           root_certificates=certs["ca.pem"], client_certificate=client_cert,
                           timeout=30) as loader:
            images, labels = next(iter(loader))
        assert images.shape == (2, 32, 32, 3) and len(labels) == 2


def test_health_port_and_the_health_command(jpeg_folder: Path,
                                             certs: dict[str, bytes]) -> None:
    """Mutual TLS and a token on the main port; --health-port answers in plaintext, in
    every worker, with health alone; `augsvc health` checks both ports."""
    d = Path(certs["dir"].decode())
    tls = ["--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
           "--tls-client-ca", str(d / "ca.pem")]
    client = ["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / "client.pem"),
              "--tls-key", str(d / "client.key")]
    with running_server({"photos": jpeg_folder}, *FAST, *tls, "--health-port", "0",
                        env={"AUGSVC_TOKEN": TOKEN}, workers=2) as server:
        assert server.health_port not in (None, server.port)
        health_address = f"{server.host}:{server.health_port}"
        with contextlib.ExitStack() as stack:
            channels = [stack.enter_context(connect(health_address)) for _ in range(8)]
            for channel in channels:
                assert health_status(channel) == SERVING
                assert health_status(channel, wire.SERVICE_NAME) == SERVING
            counts = established_by_pid(server.health_port, server.pids())
            assert sum(counts.values()) == 8 and min(counts.values()) >= 1, counts
            error = rpc_error(lambda: wire.AugmentStub(channels[0]).ListDatasets(
                pb.ListDatasetsRequest(), timeout=10))
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED  # health only

        ok = augsvc_health(health_address)
        assert (ok.returncode, ok.stdout.strip()) == (0, f"{health_address}: SERVING")
        ok = augsvc_health(server.address, "--service", wire.SERVICE_NAME, *client)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == f"{server.address} service '{wire.SERVICE_NAME}': SERVING"
        ok = augsvc_health(f"127.0.0.1:{server.port}", "--tls-server-name", "localhost",
                           *client)
        assert ok.returncode == 0, ok.stderr
        unknown = augsvc_health(health_address, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "does not know this service" in unknown.stderr
        for args in ([server.address], [server.address, "--tls-ca", str(d / "ca.pem")]):
            refused = augsvc_health(*args)  # plaintext to TLS; no client certificate
            assert refused.returncode == 3 and "no answer: UNAVAILABLE" in refused.stderr
        for args in (["localhost"], [health_address, "--timeout", "0"],
                     [health_address, "--tls-cert", str(d / "client.pem")],
                     [health_address, "--tls-ca", str(d / "missing.pem")]):
            bad = augsvc_health(*args)
            assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert server.stop() == 0


def test_health_port_is_checked() -> None:
    config = ServerConfig(datasets={"a": Path("b")}, port=50051, health_port=50051)
    with pytest.raises(ValueError, match="health port must differ"):
        config.validate()
    with pytest.raises(ValueError, match="health port must be in"):
        ServerConfig(datasets={"a": Path("b")}, health_port=70000).validate()


# ---------------------------------------------------------------------------
# worker processes and shutdown


def test_workers_share_the_port_and_a_crashed_worker_is_replaced(jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST, workers=2) as server:
        pids = server.pids()
        assert len(pids) == 2
        with contextlib.ExitStack() as stack:
            channels = [stack.enter_context(connect(server.address)) for _ in range(16)]
            for channel in channels:
                wire.AugmentStub(channel).ListDatasets(pb.ListDatasetsRequest(), timeout=10)
            counts = established_by_pid(server.port, pids)
        assert sum(counts.values()) == 16 and min(counts.values()) >= 1, counts

        os.kill(pids[0], signal.SIGKILL)

        def replaced() -> list[int] | None:
            now = server.pids()
            return now if len(now) == 2 and pids[0] not in now else None

        new = wait_for(replaced, 30, "a replacement worker")
        assert pids[1] in new
        assert server.proc.poll() is None
        for _ in range(4):  # fresh connections land on either worker
            assert_healthy(server)
        assert server.stop() == 0
        assert server.pids() == []


def test_sigterm_drains_running_streams_then_exits_0(jpeg_folder: Path) -> None:
    spec = AugmentSpec(size=(224, 224), hsv=False, pca=False)
    request = stream_request(spec=spec, batch_size=4, batches=[0, 1, 2] * 20)  # ~36 MB
    with running_server({"photos": jpeg_folder}, *FAST, "--grace", "30",
                        "--prefetch", "1", "--health-port", "0") as server:
        workers = server.pids()
        with connect(server.address) as channel:
            assembler = wire.BatchAssembler()
            frames = wire.AugmentStub(channel).StreamBatches(request, timeout=60)
            received = []
            for frame in frames:  # read the first batch, then stop reading
                batch = assembler.feed(frame)
                if batch is not None:
                    received.append(batch)
                    break
            server.send_signal(signal.SIGTERM)
            with connect(server.address) as probe:
                wait_for(lambda: health_status(probe) == NOT_SERVING, 10, "NOT_SERVING")
                assert health_status(probe, wire.SERVICE_NAME) == NOT_SERVING
                error = rpc_error(lambda: fetch(probe, stream_request()))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in error.details()
            health_address = f"{server.host}:{server.health_port}"
            with connect(health_address) as probe:  # the health-only port drains too
                assert health_status(probe) == NOT_SERVING
            draining = augsvc_health(health_address)
            assert draining.returncode == 1
            assert draining.stderr.strip() == f"augsvc health: {health_address}: NOT_SERVING"
            for frame in frames:  # the running stream finishes
                batch = assembler.feed(frame)
                if batch is not None:
                    received.append(batch)
        assert [b.header.batch_index for b in received] == [0, 1, 2] * 20
        assert server.proc.wait(30) == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
        assert "Traceback" not in server.stderr()


def test_second_signal_cancels_running_streams(jpeg_folder: Path) -> None:
    spec = AugmentSpec(size=(224, 224), hsv=False, pca=False)
    request = stream_request(spec=spec, batch_size=4, batches=[0, 1, 2] * 20)
    with running_server({"photos": jpeg_folder}, *FAST, "--grace", "60") as server, \
            connect(server.address) as channel:
        frames = wire.AugmentStub(channel).StreamBatches(request, timeout=60)
        assert isinstance(next(frames), pb.BatchHeader)
        server.send_signal(signal.SIGTERM)
        with connect(server.address) as probe:
            wait_for(lambda: health_status(probe) == NOT_SERVING, 10, "NOT_SERVING")
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert time.monotonic() - started < 15  # not the 60 s grace period
        error = rpc_error(lambda: list(frames))
        assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert "Traceback" not in server.stderr()


def test_bad_dataset_path_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "augsvc", "serve", "--dataset", f"x={tmp_path / 'missing'}",
         "--port", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "no such dataset" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_token_file_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from augsvc.cli import build_parser
    from augsvc.cli.serve import _token

    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    parse = build_parser().parse_args
    monkeypatch.setenv("AUGSVC_TOKEN", "from-env")
    args = parse(["serve", "--dataset", "a=b", "--token-file", str(token_file)])
    assert _token(args) is None and args.token_file == token_file  # the file wins over $env
    assert _token(parse(["serve", "--dataset", "a=b"])) == "from-env"
    assert _token(parse(["serve", "--dataset", "a=b", "--token", "t"])) == "t"
    with pytest.raises(ValueError, match="not both"):
        _token(parse(["serve", "--dataset", "a=b", "--token", "t", "--token-file", "f"]))
    monkeypatch.delenv("AUGSVC_TOKEN")
    assert _token(parse(["serve", "--dataset", "a=b"])) is None
