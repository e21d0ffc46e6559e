"""AugmentLoader without a real augsvc server: arithmetic, state, arguments, and the
streaming machinery against a small in-process fake server (numpy batches, no DALI)
that can fail, hang or refuse on demand."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from replicas import consume

import augsvc
from augsvc import wire
from augsvc.client import AugmentLoader, AugsvcError, BatchMeta, num_batches
from augsvc.core.sampling import EpochPlan, Sharding
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire._proto import augment_pb2_grpc as pb_grpc
from augsvc.wire.convert import StreamRequest

SPEC = AugmentSpec(size=(4, 6), hsv=False, pca=False)
TRIALS = 100  # graceful stops in test_graceful_stop_never_stalls
NUM_SAMPLES = 23
LABELS = np.arange(NUM_SAMPLES) % 3


# ---------------------------------------------------------------------------
# arithmetic


@pytest.mark.parametrize("num_samples", [1, 7, 23, 64, 100])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("tail", ["drop_last", "pad", "keep"])
def test_num_batches_matches_epoch_plan(num_samples, batch_size, world_size, tail):
    rank = world_size - 1
    try:
        expected = len(EpochPlan(num_samples, batch_size, 0, 0, rank, world_size, tail))
    except ValueError:
        with pytest.raises(ValueError, match="fewer than one round"):
            num_batches(num_samples, batch_size, world_size, tail, rank=rank)
        return
    assert num_batches(num_samples, batch_size, world_size, tail, rank=rank) == expected


@pytest.mark.parametrize("tail", ["drop_last", "pad"])
def test_num_batches_balanced_matches_epoch_plan(tail):
    labels = np.array([0] * 7 + [1] * 2 + [3] * 4)  # class 2 absent
    counts = np.bincount(labels)
    for batch_size, world_size in [(1, 1), (2, 2), (4, 3), (5, 1)]:
        plan = EpochPlan(len(labels), batch_size, 1, 2, 0, world_size, tail,
                         labels=labels, balance=True)
        assert num_batches(len(labels), batch_size, world_size, tail, counts) == len(plan)


def test_header_check_takes_a_short_last_batch_with_tail_keep():
    loader = _loader(tail="keep", batch_size=4)  # rank 1 of 2: batches 4..7, 12..15, 20..22
    shard = Sharding(NUM_SAMPLES, 4, 2, "keep")

    def header(k, n, dropped=0):
        return pb.BatchHeader(batch_index=k, shape=[n, 4, 6, 3], dtype="uint8", layout="NHWC",
                              dropped=[pb.DroppedSample(sample_id=k)] * dropped)

    loader._check(header(1, 4), 1, "s", shard, {})
    loader._check(header(2, 3), 2, "s", shard, {})
    loader._check(header(2, 2, dropped=1), 2, "s", shard, {})
    for k, n in ((2, 4), (1, 3)):
        with pytest.raises(wire.WireError, match=f"length of batch {k}"):
            loader._check(header(k, n), k, "s", shard, {})
    with pytest.raises(wire.WireError, match="length of batch 1"):  # drop_last: all full
        _loader(batch_size=4)._check(header(1, 3), 1, "s", Sharding(NUM_SAMPLES, 4, 2), {})


def test_header_check_holds_a_pass_to_one_set_of_statistics():
    """Fancy PCA or normalize: every batch of a pass made with the first batch's statistics
    (AugsvcError, not a retry); a spec that uses none takes any."""
    shard = Sharding(NUM_SAMPLES, 2, 2)

    def header(k, source, digest, dtype="uint8"):
        return pb.BatchHeader(batch_index=k, shape=[2, 4, 6, 3], dtype=dtype, layout="NHWC",
                              stats_source=source, stats_digest=digest)

    for spec in (SPEC.replace(pca=True), SPEC.replace(normalize=True, dtype="float32")):
        loader, first, dtype = _loader(spec=spec), {}, spec.dtype
        loader._check(header(0, "dataset", "aa", dtype), 0, "a:1", shard, first)
        loader._check(header(1, "dataset", "aa", dtype), 1, "b:1", shard, first)
        for source, digest in (("imagenet", "bb"), ("dataset", "cc")):
            with pytest.raises(AugsvcError, match="statistics of dataset 'photos' differ") as info:
                loader._check(header(2, source, digest, dtype), 2, "b:1", shard, first)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "a:1 made batches with 'dataset' statistics (aa)" in str(info.value)
        loader._check(header(2, "imagenet", "bb", dtype), 2, "c:1", shard, {})  # a new pass
    plain, first = _loader(), {}
    plain._check(header(0, "dataset", "aa"), 0, "a:1", shard, first)
    plain._check(header(1, "imagenet", "bb"), 1, "b:1", shard, first)


# ---------------------------------------------------------------------------
# arguments and state


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"servers": []}, ValueError),
    ({"servers": [""]}, ValueError),
    ({"dataset": ""}, ValueError),
    ({"batch_size": 0}, ValueError),
    ({"batch_size": 2.0}, TypeError),
    ({"seed": -1}, ValueError),
    ({"rank": 2, "world_size": 2}, ValueError),
    ({"world_size": 0}, ValueError),
    ({"epoch": -1}, ValueError),
    ({"streams_per_server": 0}, ValueError),
    ({"tail": "wrap"}, ValueError),
    ({"balance": 1}, TypeError),
    ({"shuffle": "no"}, TypeError),
    ({"output": "jax"}, ValueError),
    ({"device": "cpu"}, ValueError),  # device needs output="torch"
    ({"timeout": 0}, ValueError),
    ({"reconnect_timeout": 0}, ValueError),
    ({"resolve_interval": -1}, ValueError),
    ({"resolve": "getaddrinfo"}, TypeError),
    ({"servers": ["ipv4:10.0.0.1:1"]}, ValueError),
    ({"servers": ["host:0"]}, ValueError),
    ({"prefetch": 0}, ValueError),
    ({"spec": {"crop": "center_crop"}}, TypeError),
    ({"normalize": True, "spec": AugmentSpec(normalize=True, dtype="float32")}, ValueError),
])
def test_bad_arguments(kwargs, error):
    args = {"servers": "127.0.0.1:1", "dataset": "d", **kwargs}
    with pytest.raises(error):
        AugmentLoader(**args)


@pytest.mark.parametrize(("address", "target"), [
    ("aug-0", "aug-0:50051"), ("aug-0:7000", "aug-0:7000"), ("10.0.0.5", "10.0.0.5:50051"),
    ("::1", "[::1]:50051"), ("[::1]", "[::1]:50051"), ("[::1]:7000", "[::1]:7000"),
    ("dns:///aug:7000", "dns:///aug:7000"), ("unix:/run/augsvc.sock", "unix:/run/augsvc.sock"),
])
def test_an_address_without_a_port_means_50051(address, target):
    loader = AugmentLoader([address, "other:1"], "d")
    assert loader.pool.targets == (target, "other:1")


def test_output_torch_without_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what an install without torch sees
    with pytest.raises(ImportError, match=r"pip install 'augsvc\[torch\]'"):
        AugmentLoader("127.0.0.1:1", "d", output="torch")


def test_help_lists_every_argument_on_one_line():
    import inspect
    import pydoc

    text = pydoc.render_doc(AugmentLoader, renderer=pydoc.plaintext)
    args = text[text.index("Args:"):]
    for name in list(inspect.signature(AugmentLoader).parameters):
        assert re.search(rf"^[ |]+{name}: \S", args, re.MULTILINE), name  # help's " |  "


def test_public_facade():
    assert augsvc.AugmentLoader is AugmentLoader
    assert augsvc.AugsvcError is AugsvcError
    assert augsvc.AugmentSpec is AugmentSpec
    assert isinstance(augsvc.__version__, str)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, augsvc; print(sorted(m for m in ('torch', 'nvidia.dali', 'grpc') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _loader(**kwargs) -> AugmentLoader:
    args = {"servers": "127.0.0.1:1", "dataset": "photos", "spec": SPEC, "batch_size": 2,
            "seed": 5, "world_size": 2, "rank": 1, **kwargs}
    return AugmentLoader(**args)


def test_state_dict_round_trip():
    a = _loader(epoch=3)
    state = a.state_dict()
    assert state["epoch"] == 3 and state["next_batch"] == 0 and state["seed"] == 5
    state["next_batch"] = 4
    b = _loader()
    b.load_state_dict(state)
    assert b.epoch == 3 and b.state_dict() == state
    b.set_epoch(3)  # the training loop's set_epoch keeps the resume point
    assert b.state_dict()["next_batch"] == 4
    b.set_epoch(4)  # another epoch starts from its first batch
    assert b.state_dict()["next_batch"] == 0 and b.epoch == 4


@pytest.mark.parametrize(("change", "field"), [
    ({"seed": 6}, "seed"),
    ({"dataset": "other"}, "dataset"),
    ({"world_size": 4}, "world_size"),
    ({"batch_size": 3}, "batch_size"),
    ({"spec": SPEC.replace(p_hflip=0.0)}, "spec"),
    ({"tail": "pad"}, "tail"),
    ({"shuffle": False}, "shuffle"),
])
def test_state_dict_mismatch(change, field):
    state = _loader().state_dict()
    with pytest.raises(ValueError, match=field):
        _loader(**change).load_state_dict(state)


def test_state_dict_malformed():
    loader = _loader()
    with pytest.raises(ValueError, match="format"):
        loader.load_state_dict({"epoch": 1})
    state = loader.state_dict()
    del state["next_batch"]
    with pytest.raises(ValueError, match="next_batch"):
        loader.load_state_dict(state)


def test_a_state_saved_before_shuffle_existed_loads():
    state = _loader().state_dict()
    del state["shuffle"]  # saved by a loader that always shuffled
    _loader().load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        _loader(shuffle=False).load_state_dict(state)


# ---------------------------------------------------------------------------
# no server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_fails_fast():
    loader = AugmentLoader(f"127.0.0.1:{_free_port()}", "photos", SPEC, 2, timeout=5,
                           reconnect_timeout=1)
    start = time.monotonic()
    with pytest.raises(AugsvcError) as info:
        len(loader)
    assert time.monotonic() - start < 5
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(AugsvcError), loader:
        next(iter(loader))


# ---------------------------------------------------------------------------
# a fake server


def fake_pixels(seed: int, epoch: int, draw_ids: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic pixels for these draw ids, (N, *shape) uint8."""
    n = int(np.prod(shape))
    base = (np.asarray(draw_ids, dtype=np.int64) * 31 + seed * 7 + epoch * 3)[:, None]
    return ((base + np.arange(n)[None, :]) % 251).astype(np.uint8).reshape(len(draw_ids), *shape)


def expected_epoch(seed, epoch, rank, world_size, batch_size, spec=SPEC, tail="drop_last"):
    plan = EpochPlan(NUM_SAMPLES, batch_size, seed, epoch, rank, world_size, tail)
    return [(fake_pixels(seed, epoch, b.draw_ids, _shape(spec)), LABELS[b.sample_ids],
             b.sample_ids) for b in map(plan.batch, range(len(plan)))]


def _shape(spec: AugmentSpec) -> tuple[int, int, int]:
    h, w = spec.size
    return (h, w, 3) if spec.layout == "NHWC" else (3, h, w)


class FakeServicer(pb_grpc.AugmentServicer):
    """Serves a NUM_SAMPLES-sample dataset "photos" with `fake_pixels`.

    `fault(call_number, request)` may return None, ("abort", code, after_batches,
    mid_batch) or ("hang", seconds, after_batches). Once `refusing`, new streams get
    UNAVAILABLE, as from a draining augsvc server; `active` counts running calls.
    """

    def __init__(self, token: str | None = None) -> None:
        self.calls = 0
        self.refusing = False
        self.active = 0
        self.cond = threading.Condition()
        self.requested: list[list[int]] = []
        self.epochs: list[int] = []  # the epoch of each call
        self.fault: Callable[[int, pb.StreamBatchesRequest], tuple | None] = lambda i, r: None
        self.token = token
        self._lock = threading.Lock()

    def _auth(self, context) -> None:
        if self.token and dict(context.invocation_metadata()).get("authorization") != \
                f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    def GetDataset(self, request, context):
        self._auth(context)
        if request.name != "photos":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no dataset {request.name!r}")
        stats = pb.DatasetStats(
            source="imagenet", mean=IMAGENET.mean.tolist(), std=IMAGENET.std.tolist(),
            cov=IMAGENET.cov.reshape(-1).tolist(), eigvals=IMAGENET.eigvals.tolist(),
            eigvecs=IMAGENET.eigvecs.reshape(-1).tolist())
        return pb.DatasetInfo(name="photos", num_samples=NUM_SAMPLES, classes=["a", "b", "c"],
                              stats=stats, stats_sources=["imagenet"])

    def StreamBatches(self, request, context) -> Iterator[bytes]:
        self._auth(context)
        if request.dataset != "photos":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no dataset {request.dataset!r}")
        with self.cond:
            if self.refusing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            self.active += 1
        context.add_callback(self._ended)  # when the call has ended, status sent
        req = StreamRequest.from_proto(request)
        with self._lock:
            call, self.calls = self.calls, self.calls + 1
            self.requested.append(list(req.batches))
            self.epochs.append(req.epoch)
        fault = self.fault(call, request)
        plan = EpochPlan(NUM_SAMPLES, req.batch_size, req.seed, req.epoch, req.rank,
                         req.world_size, req.tail)
        for n, k in enumerate(req.batches or range(len(plan))):
            if fault and fault[0] == "hang" and n == fault[2]:
                time.sleep(fault[1])
            if fault and fault[0] == "abort" and n == fault[2] and not fault[3]:
                context.abort(fault[1], "injected failure")
            b = plan.batch(k)
            frames = wire.encode_batch(
                fake_pixels(req.seed, req.epoch, b.draw_ids, _shape(req.spec)), batch_index=k,
                layout=req.spec.layout, labels=LABELS[b.sample_ids], sample_ids=b.sample_ids,
                draw_ids=b.draw_ids, chunk_bytes=16,
            )
            for j, frame in enumerate(frames):
                if fault and fault[0] == "abort" and n == fault[2] and fault[3] and j == 2:
                    context.abort(fault[1], "injected failure mid-batch")
                yield frame


    def _ended(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()


class FakeServer:
    def __init__(self, token: str | None = None, tls: tuple[bytes, bytes] | None = None) -> None:
        self.servicer = FakeServicer(token)
        self.executor = futures.ThreadPoolExecutor(max_workers=8)
        self.server = grpc.server(self.executor, options=wire.server_options())
        wire.add_augment_servicer(self.servicer, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.address = f"127.0.0.1:{self.port}"
        else:
            creds = grpc.ssl_server_credentials([tls])  # (key, certificate chain)
            self.port = self.server.add_secure_port("localhost:0", creds)
            self.address = f"localhost:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)
        self.executor.shutdown(wait=False)

    def drain_and_stop(self) -> None:
        """What `augsvc serve` does on SIGTERM: refuse new streams, let the running ones
        end, then stop (GOAWAY); the port then refuses connections."""
        servicer = self.servicer
        with servicer.cond:
            servicer.refusing = True
            assert servicer.cond.wait_for(lambda: servicer.active == 0, 10)
        self.stop()


@pytest.fixture
def fake():
    servers = []

    def make(**kwargs) -> FakeServer:
        servers.append(FakeServer(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def _assert_epoch(got, want):
    assert len(got) == len(want)
    for (images, labels, *_), (w_images, w_labels, _) in zip(got, want, strict=True):
        np.testing.assert_array_equal(images, w_images)
        np.testing.assert_array_equal(labels, w_labels)


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("augsvc-stream")]


def test_epoch_in_order_over_streams(fake):
    a, b = fake(), fake()
    with AugmentLoader([a.address, b.address], "photos", SPEC, 2, seed=1, rank=1, world_size=2,
                       streams_per_server=2, batches_per_request=1, return_meta=True) as loader:
        assert len(loader) == 5
        got = list(loader)
    _assert_epoch(got, expected_epoch(1, 0, 1, 2, 2))
    assert [meta.index for *_, meta in got] == list(range(5))
    assert isinstance(got[0][2], BatchMeta) and loader.last_dropped == ()
    assert a.servicer.calls > 0 and b.servicer.calls > 0  # both servers did work
    assert not _stream_threads()


def test_epochs_and_resume(fake):
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 3, seed=2, epoch=1)
    loader.set_epoch(2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    assert state["next_batch"] == 3 and state["epoch"] == 2
    rest = list(it)
    _assert_epoch(first + rest, expected_epoch(2, 2, 0, 1, 3))
    resumed = AugmentLoader(a.address, "photos", SPEC, 3, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    _assert_epoch(list(resumed), expected_epoch(2, 2, 0, 1, 3)[3:])
    assert resumed.state_dict()["next_batch"] == len(resumed)
    _assert_epoch(list(resumed), expected_epoch(2, 3, 0, 1, 3))  # the next pass: epoch 3


def test_epochs_back_to_back(fake):
    a, b = fake(), fake()
    kwargs = {"seed": 4, "streams_per_server": 2, "batches_per_request": 2, "prefetch": 3,
              "return_meta": True}
    with AugmentLoader([a.address, b.address], "photos", SPEC, 3, epoch=1, **kwargs) as loader:
        n = len(loader)
        seen_epochs = []
        got = []
        for item in loader.epochs(3):
            got.append(item)
            seen_epochs.append(loader.epoch)
        assert loader.state_dict()["epoch"] == 3 and loader.state_dict()["next_batch"] == n
    want = [w for e in (1, 2, 3) for w in expected_epoch(4, e, 0, 1, 3)]
    _assert_epoch(got, want)
    assert seen_epochs == [1] * n + [2] * n + [3] * n
    assert [meta.index for *_, meta in got] == list(range(n)) * 3
    # read-ahead crossed the boundaries, one epoch per call
    calls = [(e, ks) for srv in (a, b)
             for e, ks in zip(srv.servicer.epochs, srv.servicer.requested, strict=True)]
    assert {e for e, _ in calls} == {1, 2, 3}
    assert all(0 < len(ks) <= 2 for _, ks in calls)
    assert sorted((e, k) for e, ks in calls for k in ks) == \
        [(e, k) for e in (1, 2, 3) for k in range(n)]
    assert not _stream_threads()


def test_epochs_resume_mid_epoch_and_without_end(fake):
    import itertools

    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 3, seed=2, epoch=5)
    n = len(loader)
    endless = loader.epochs()
    first = list(itertools.islice(endless, n + 2))  # into the second epoch
    state = loader.state_dict()
    assert (state["epoch"], state["next_batch"]) == (6, 2)
    endless.close()  # leaving the pass closes its streams
    assert not _stream_threads()
    _assert_epoch(first, expected_epoch(2, 5, 0, 1, 3) + expected_epoch(2, 6, 0, 1, 3)[:2])
    resumed = AugmentLoader(a.address, "photos", SPEC, 3, seed=2)
    resumed.load_state_dict(state)
    _assert_epoch(list(resumed.epochs(2)),
                  expected_epoch(2, 6, 0, 1, 3)[2:] + expected_epoch(2, 7, 0, 1, 3))


def test_each_pass_is_the_next_epoch(fake):
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 3, seed=2, epoch=1)
    assert loader.epoch == 1
    first, second = list(loader), list(loader)
    assert loader.epoch == 2
    _assert_epoch(first, expected_epoch(2, 1, 0, 1, 3))
    _assert_epoch(second, expected_epoch(2, 2, 0, 1, 3))
    assert not np.array_equal(first[0][0], second[0][0])
    for _ in range(2):  # set_epoch before every pass: that epoch, every time
        loader.set_epoch(1)
        _assert_epoch(list(loader), expected_epoch(2, 1, 0, 1, 3))
    for _ in loader:  # a pass broken off was a pass
        assert loader.epoch == 2
        break
    _assert_epoch(list(loader), expected_epoch(2, 3, 0, 1, 3))
    _assert_epoch(list(loader.epochs(2)), expected_epoch(2, 4, 0, 1, 3) +
                  expected_epoch(2, 5, 0, 1, 3))
    assert loader.epoch == 5
    _assert_epoch(list(loader), expected_epoch(2, 6, 0, 1, 3))  # after epochs(): the next


def test_state_dict_resumes_counted_epochs(fake):
    a = fake()

    def fresh(state=None):
        loader = AugmentLoader(a.address, "photos", SPEC, 3, seed=2)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    want = {e: expected_epoch(2, e, 0, 1, 3) for e in (1, 2)}
    loader = fresh()
    n = len(loader)
    list(loader)  # epoch 0
    it = iter(loader)  # epoch 1, counted
    [next(it) for _ in range(2)]
    mid = loader.state_dict()
    list(it)
    end = loader.state_dict()
    assert (mid["epoch"], mid["next_batch"], end["epoch"], end["next_batch"]) == (1, 2, 1, n)
    resumed = fresh(mid)  # mid-epoch: the rest of epoch 1, then epoch 2
    _assert_epoch(list(resumed), want[1][2:])
    _assert_epoch(list(resumed), want[2])
    resumed = fresh(end)  # after the epoch's last batch: epoch 2, as the saved run goes on
    assert resumed.epoch == 1
    _assert_epoch(list(resumed), want[2])
    assert resumed.epoch == 2
    resumed = fresh(end)  # a loop that names the finished epoch gets the empty rest of it
    resumed.set_epoch(1)
    assert list(resumed) == []
    resumed.set_epoch(2)
    _assert_epoch(list(resumed), want[2])


@pytest.mark.parametrize(("count", "error"), [(0, ValueError), (-1, ValueError),
                                              (1.5, TypeError), (True, TypeError)])
def test_epochs_bad_count(count, error):
    with pytest.raises(error, match="count"):
        _loader().epochs(count)


@pytest.mark.parametrize("mid_batch", [False, True])
def test_failing_stream_is_retried_elsewhere(fake, mid_batch):
    a, b = fake(), fake()
    # every call to a fails after its first batch
    a.servicer.fault = lambda i, r: ("abort", grpc.StatusCode.UNAVAILABLE, 1, mid_batch)
    loader = AugmentLoader([a.address, b.address], "photos", SPEC, 1, seed=3,
                           batches_per_request=3)
    got = list(loader)
    _assert_epoch(got, expected_epoch(3, 0, 0, 1, 1))
    requested = [k for srv in (a, b) for ks in srv.servicer.requested for k in ks]
    assert len(requested) > len(set(requested))  # some batches were asked for again


def test_transient_failures_recover_on_one_server(fake):
    a = fake()
    a.servicer.fault = lambda i, r: ("abort", grpc.StatusCode.UNAVAILABLE, 0, True) if i < 2 \
        else None
    loader = AugmentLoader(a.address, "photos", SPEC, 4, streams_per_server=1)
    _assert_epoch(list(loader), expected_epoch(0, 0, 0, 1, 4))


def test_dead_server_everywhere_raises(fake):
    a = fake()
    a.servicer.fault = lambda i, r: ("abort", grpc.StatusCode.UNAVAILABLE, 0, False)
    loader = AugmentLoader(a.address, "photos", SPEC, 4, reconnect_timeout=1)
    with pytest.raises(AugsvcError, match="no augsvc server answered for 1 s") as info:
        list(loader)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert not _stream_threads()


def test_hung_stream_is_abandoned(fake):
    a, b = fake(), fake()
    a.servicer.fault = lambda i, r: ("hang", 30, 0)
    loader = AugmentLoader([a.address, b.address], "photos", SPEC, 4, timeout=1.0,
                           streams_per_server=1)
    start = time.monotonic()
    _assert_epoch(list(loader), expected_epoch(0, 0, 0, 1, 4))
    assert time.monotonic() - start < 10


def test_a_name_without_addresses_yet_is_waited_for(fake, caplog):
    """A one-replica deployment restarting: the name resolves to nothing for a while."""
    a = fake()
    answers = ["127.0.0.1"]

    def resolve(host, port):
        assert (host, port) == ("aug.test", a.port)
        if not answers:
            raise OSError("Name or service not known")
        return answers

    loader = AugmentLoader(f"dns:///aug.test:{a.port}", "photos", SPEC, 4, seed=2,
                           resolve=resolve)
    assert len(loader) == 5
    answers.clear()
    threading.Timer(1.5, answers.append, ("127.0.0.1",)).start()
    begin = time.monotonic()
    _assert_epoch(list(loader), expected_epoch(2, 0, 0, 1, 4))
    assert time.monotonic() - begin > 1.4  # it waited, then found the replica
    waits = [r.getMessage() for r in caplog.records if "no augsvc server" in r.getMessage()]
    assert len(waits) == 1 and "Name or service not known" in waits[0]


@pytest.mark.timeout(300)
def test_graceful_stop_never_stalls(fake):
    """Issue 9.1 on in-process servers: many trials, each stopping one of two servers the
    way augsvc serve does on SIGTERM. Sometimes grpcio leaves the call started just as the
    GOAWAY arrives with a status but an iterator that never returns (see
    scripts/grpc_stuck_call.py): the loader must abandon it, not wait."""
    steady = fake()
    stalls = 0
    for trial in range(TRIALS):
        victim = fake()
        stop_at = 2 + trial % 12

        def on_batch(i: int, victim=victim, stop_at=stop_at) -> None:
            if i == stop_at:
                victim.drain_and_stop()

        with AugmentLoader([victim.address, steady.address], "photos", SPEC, 1, seed=trial,
                           batches_per_request=1) as loader:
            got = consume(loader, on_batch, stall_s=15, what=f"trial {trial}")
        _assert_epoch(got, expected_epoch(trial, 0, 0, 1, 1))
        stalls += loader.stats().abandoned
    print(f"{TRIALS} graceful stops, {stalls} stuck call(s) abandoned")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.PERMISSION_DENIED])
def test_fatal_status_raises_at_once(fake, code):
    a = fake()
    a.servicer.fault = lambda i, r: ("abort", code, 1, False)
    loader = AugmentLoader(a.address, "photos", SPEC, 2)
    with pytest.raises(AugsvcError, match="injected failure") as info:
        list(loader)
    assert info.value.code is code and info.value.server == a.address
    assert info.value.details == "injected failure"


def test_unknown_dataset_and_token(fake):
    a = fake(token="s3cret")
    with pytest.raises(AugsvcError) as info:
        len(AugmentLoader(a.address, "photos", SPEC, 2))
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(AugsvcError) as info:
        len(AugmentLoader(a.address, "nope", SPEC, 2, token="s3cret"))
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert len(AugmentLoader(a.address, "photos", SPEC, 2, token="s3cret")) == 11


def test_read_ahead_is_bounded(fake):
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 1, streams_per_server=2,
                           batches_per_request=1, prefetch=3)
    it = iter(loader)
    next(it)
    time.sleep(0.5)  # let the streams run ahead as far as they may
    requested = sorted(k for ks in a.servicer.requested for k in ks)
    assert max(requested) <= 3  # batch 0 consumed: batches 1..3 may be ahead
    loader.close()
    assert not _stream_threads()


def test_break_closes_streams(fake):
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 1)
    for _ in loader:
        break
    time.sleep(0.1)
    assert not _stream_threads()


def test_normalize_numpy(fake):
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 4, normalize=True)
    images, _ = next(iter(loader))
    raw = expected_epoch(0, 0, 0, 1, 4)[0][0]
    want = (raw / 255.0 - IMAGENET.mean) / IMAGENET.std
    assert images.dtype == np.float32
    np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)
    loader.close()


def test_torch_output(fake):
    torch = pytest.importorskip("torch")
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC.replace(layout="NCHW"), 4, output="torch",
                           normalize=True)
    want = expected_epoch(0, 0, 0, 1, 4, spec=SPEC.replace(layout="NCHW"))
    batches = list(torch.utils.data.DataLoader(loader.torch_dataset(), batch_size=None))
    assert len(batches) == len(want) == len(loader.torch_dataset())
    images, labels = batches[0]
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (4, 3, 4, 6)
    np.testing.assert_array_equal(labels.numpy(), want[0][1])
    mean = torch.tensor(IMAGENET.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET.std, dtype=torch.float32).view(3, 1, 1)
    raw = (images * std + mean) * 255
    np.testing.assert_allclose(raw.numpy(), want[0][0], atol=1e-3)


@pytest.mark.timeout(60)
def test_torch_dataloader_workers_keep_order(fake):
    torch = pytest.importorskip("torch")
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 2, output="torch")
    data = torch.utils.data.DataLoader(loader.torch_dataset(), batch_size=None, num_workers=2)
    got = [(images.numpy(), labels.numpy()) for images, labels in data]
    _assert_epoch(got, expected_epoch(0, 0, 0, 1, 2))


@pytest.mark.timeout(120)
def test_torch_dataloader_workers_and_epochs(fake):
    torch = pytest.importorskip("torch")
    a = fake()
    loader = AugmentLoader(a.address, "photos", SPEC, 2, seed=1, output="torch")

    def passes(data, epochs):
        for epoch in epochs:
            got = [(images.numpy(), labels.numpy()) for images, labels in data]
            _assert_epoch(got, expected_epoch(1, epoch, 0, 1, 2))

    # workers copy the loader at each pass: set_epoch before each one
    data = torch.utils.data.DataLoader(loader.torch_dataset(), batch_size=None, num_workers=2)
    for epoch in (3, 4):
        loader.set_epoch(epoch)
        passes(data, [epoch])
    # persistent workers keep their copies, which count the epochs by themselves
    data = torch.utils.data.DataLoader(loader.torch_dataset(), batch_size=None, num_workers=2,
                                       persistent_workers=True)
    passes(data, [4, 5])


def test_tls(fake, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    a = fake(tls=(key.read_bytes(), cert.read_bytes()), token="t")
    for root in (cert, str(cert), cert.read_bytes(), cert.read_text()):
        loader = AugmentLoader(a.address, "photos", SPEC, 4, root_certificates=root, token="t")
        _assert_epoch(list(loader), expected_epoch(0, 0, 0, 1, 4))
    with pytest.raises(AugsvcError) as info:  # plaintext to a TLS port
        len(AugmentLoader(a.address, "photos", SPEC, 4, token="t", timeout=5,
                          reconnect_timeout=1))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_cuda_device_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA"):
        AugmentLoader("127.0.0.1:1", "d", SPEC, 2, output="torch", device="cuda")


# ---------------------------------------------------------------------------
# loader.stats() and its Prometheus export


def _requested_per_server(*servers: FakeServer) -> dict[str, int]:
    return {s.address: sum(map(len, s.servicer.requested)) for s in servers}


def test_stats_count_a_known_epoch(fake):
    a, b = fake(), fake()
    begin = time.monotonic()
    with AugmentLoader([a.address, b.address], "photos", SPEC, 2, seed=1,
                       batches_per_request=1) as loader:
        got = list(loader)
        stats = loader.stats()
    elapsed = time.monotonic() - begin
    n = len(got)
    assert n == 11 and stats.batches == n
    per_server = {address: s.batches for address, s in stats.servers.items()}
    assert per_server == _requested_per_server(a, b)  # no failure: each batch asked once
    assert sum(per_server.values()) == n
    for server in stats.servers.values():
        assert server.images == 2 * server.batches
        assert server.bytes == server.images * 4 * 6 * 3  # SPEC: 4 x 6 RGB uint8
        assert 0 < server.seconds < elapsed and server.images_per_s > 0
        assert server.failures == server.reconnects == 0
    assert stats.retries == stats.failovers == stats.abandoned == stats.reconnects == 0
    assert 0 < stats.wait_s < elapsed  # the first batch, at least, was waited for
    assert stats.as_dict()["servers"][a.address]["images_per_s"] == \
        stats.servers[a.address].images_per_s
    again = loader.stats()  # cumulative, and a snapshot: the pass is over
    assert again == stats


def test_stats_count_a_forced_failover(fake):
    a = fake()
    # the first two calls fail mid-batch after one batch; each had asked for three
    a.servicer.fault = lambda i, r: ("abort", grpc.StatusCode.UNAVAILABLE, 1, True) \
        if i < 2 else None
    with AugmentLoader(a.address, "photos", SPEC, 1, seed=3, streams_per_server=1,
                       batches_per_request=3) as loader:
        got = list(loader)
        stats = loader.stats()
    _assert_epoch(got, expected_epoch(3, 0, 0, 1, 1))
    first_two = a.servicer.requested[:2]
    assert [len(r) for r in first_two] == [3, 3]
    assert stats.retries == 2 and stats.servers[a.address].failures == 2
    assert stats.failovers == 4  # two batches handed back by each failed call
    assert stats.reconnects == 2  # the server answered again after each failure
    assert stats.servers[a.address].batches == stats.batches == len(got) == NUM_SAMPLES
    assert stats.abandoned == 0


def test_stats_prometheus_export(fake):
    prometheus_client = pytest.importorskip("prometheus_client")
    from augsvc.client.metrics import register_loader_metrics

    a = fake()
    registry = prometheus_client.CollectorRegistry()
    with AugmentLoader(a.address, "photos", SPEC, 4) as loader:
        collector = register_loader_metrics(loader, registry, labels={"rank": "0"})
        n = len(list(loader))
    value = registry.get_sample_value
    assert value("augsvc_loader_batches_total", {"rank": "0"}) == n
    assert value("augsvc_loader_server_images_total", {"rank": "0", "server": a.address}) == 4 * n
    assert value("augsvc_loader_retries_total", {"rank": "0"}) == 0
    assert value("augsvc_loader_wait_seconds_total", {"rank": "0"}) > 0
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE augsvc_loader_server_bytes_total counter" in text
    registry.unregister(collector)
    assert value("augsvc_loader_batches_total", {"rank": "0"}) is None


def test_client_does_not_need_prometheus():
    import subprocess
    import sys

    code = ("import sys, augsvc.client, augsvc.client.loader, augsvc.client.metrics; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
