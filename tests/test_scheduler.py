"""The shared pipeline: several batches in DALI at once, one pipeline for many streams,
fair progress, no cross-talk; DALI only in worker processes; `--gpus` assignment.

In-process servers (`start_server`, a real gRPC server on a loopback port) where a
test looks inside the worker; `augsvc serve` subprocesses for the process checks.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serverproc import running_server
from test_server import FAST, SMALL, assert_healthy, connect, stream_request

from augsvc import wire
from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import open_dataset
from augsvc.engine.pipeline import AugmentPipeline
from augsvc.server import ServerConfig, start_server
from augsvc.server.gpus import parse_gpus, pin_to_gpu, worker_gpu
from augsvc.wire._proto import augment_pb2 as pb

SPEC = AugmentSpec(size=(48, 48), p_vflip=0.5)


# ---------------------------------------------------------------------------
# the engine: batches in flight


@pytest.mark.parametrize("corrupt", ["substitute", "drop"])
def test_batches_in_flight_finish_in_order_and_equal_one_at_a_time(
        tmp_path: Path, jpeg_folder: Path, corrupt: str) -> None:
    """Three batches submitted before the first is collected, the middle one with an
    undecodable image and the last with a truncated one: each result equals running it
    alone; the bad images are substituted (the same stand-in, the same bytes) or dropped."""
    data = tmp_path / "data"
    for f in sorted(jpeg_folder.glob("*/*.jpg")):
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        (data / f.parent.name / f.name).write_bytes(f.read_bytes())
    broken = data / "class_01" / "img_0001.jpg"
    raw = bytearray(broken.read_bytes())
    dht = raw.index(b"\xff\xc4")
    raw[dht + 5 : dht + 21] = b"\xff" * 16  # a bogus Huffman table: DALI rejects the batch
    broken.write_bytes(bytes(raw))
    truncated = data / "class_00" / "img_0002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:600])  # fails the byte screen in start()
    index = open_dataset(data)
    bad, short = index.paths.index(str(broken)), index.paths.index(str(truncated))
    groups = [[0, 1, 3, 4], [bad, 8, 9, 10], [11, short, 6, 7]]
    spec = SPEC.replace(corrupt=corrupt)
    engine = Augmenter(index, spec, IMAGENET, max_batch_size=4, num_threads=1)
    alone = Augmenter(index, spec, IMAGENET, max_batch_size=4, num_threads=1)
    try:
        started = [engine.start(5, 1, ids, ids) for ids in groups]
        assert engine.pipeline.in_flight == 3
        results = [engine.finish(s) for s in started]
        with pytest.raises(RuntimeError, match="finished already"):
            engine.finish(started[0])
        for ids, got in zip(groups, results, strict=True):
            want = alone.run(5, 1, ids, ids)
            np.testing.assert_array_equal(got.images, want.images)
            np.testing.assert_array_equal(got.sample_ids, want.sample_ids)
            np.testing.assert_array_equal(got.draw_ids, want.draw_ids)
            assert got.substituted == want.substituted and got.dropped == want.dropped
        if corrupt == "drop":
            assert [d.sample_id for d in results[1].dropped] == [bad]
            assert results[1].sample_ids.tolist() == [8, 9, 10]
            assert [d.sample_id for d in results[2].dropped] == [short]
            assert results[2].sample_ids.tolist() == [11, 6, 7]
        else:
            for result, row, own in ((results[1], 0, bad), (results[2], 1, short)):
                assert len(result.sample_ids) == 4 and result.dropped == ()
                (sub,) = result.substituted
                assert (sub.row, sub.sample_id) == (row, own)
                assert result.sample_ids[row] == sub.substitute_id != own
                assert result.draw_ids[row] < 0  # the substitute's own draw
            assert "decode failed" in results[1].substituted[0].reason
        # the output is DALI's buffer, not a copy of it
        assert not results[0].images.flags.owndata
    finally:
        engine.close()
        alone.close()


# ---------------------------------------------------------------------------
# one pipeline for many streams


def _server(folder: Path, **options: object):
    config = ServerConfig(datasets={"photos": folder}, port=0, device="cpu", dali_threads=1,
                          io_threads=2, **options)
    return start_server(config)


def test_four_streams_share_one_pipeline_progress_alike_and_get_their_own_batches(
        jpeg_folder: Path) -> None:
    server = _server(jpeg_folder)
    arrivals: dict[int, list[float]] = {s: [] for s in range(4)}
    batches: dict[int, list[wire.AssembledBatch]] = {s: [] for s in range(4)}
    order = list(range(6)) * 5  # 30 batches of 2 per stream

    def read(seed: int) -> None:
        request = stream_request(seed=seed, batch_size=2, batches=order)
        with connect(f"127.0.0.1:{server.port}") as channel:
            for batch in wire.assemble(wire.AugmentStub(channel).StreamBatches(
                    request, timeout=120)):
                arrivals[seed].append(time.monotonic())
                batches[seed].append(batch)

    try:
        threads = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert server.pool.built == 1  # one pipeline for the four streams
    finally:
        server.shutdown(grace=0)
    # fair: counted while all four were running, every stream got about as many batches
    start = max(times[0] for times in arrivals.values())
    end = min(times[-1] for times in arrivals.values())
    counts = [sum(start <= t <= end for t in times) for times in arrivals.values()]
    assert min(counts) >= 0.6 * max(counts) and max(counts) >= 10, counts
    # no cross-talk: each stream got its own seed's batches, as the engine makes them
    index = open_dataset(jpeg_folder)
    engine = Augmenter(index, SMALL, IMAGENET, max_batch_size=2, num_threads=1)
    try:
        for seed, got in batches.items():
            plan = EpochPlan(len(index), 2, seed, 0, labels=index.labels)
            assert [b.header.batch_index for b in got] == order
            for b in got[:6]:
                want = engine.run_batch(seed, 0, plan.batch(b.header.batch_index))
                assert b.array.tobytes() == want.images.tobytes()
    finally:
        engine.close()


def test_the_next_batch_runs_while_the_last_is_sent(jpeg_folder: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch is submitted to DALI before the one before it is collected."""
    in_flight_at_submit: list[int] = []
    original = AugmentPipeline.submit

    def submit(self: AugmentPipeline, *args: object) -> None:
        in_flight_at_submit.append(self.in_flight)
        original(self, *args)

    monkeypatch.setattr(AugmentPipeline, "submit", submit)
    server = _server(jpeg_folder)
    try:
        with connect(f"127.0.0.1:{server.port}") as channel:
            frames = wire.AugmentStub(channel).StreamBatches(
                stream_request(batch_size=2, batches=list(range(6))), timeout=60)
            assert len(list(wire.assemble(frames))) == 6
    finally:
        server.shutdown(grace=0)
    assert len(in_flight_at_submit) == 6 and max(in_flight_at_submit) == 1


# ---------------------------------------------------------------------------
# processes: DALI only in workers, --gpus


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_parent_never_loads_dali_its_workers_do(jpeg_folder: Path) -> None:
    with running_server({"photos": jpeg_folder}, *FAST) as server:
        assert_healthy(server)  # a stream ran: the worker built a pipeline
        parent = _maps(server.proc.pid)
        assert "libdali" not in parent and "libcuda" not in parent
        for worker in server.pids():
            assert "libdali" in _maps(worker)


def test_gpu_list_parsing_and_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert parse_gpus("all") == (0, 1) and parse_gpus("1") == (1,)
    assert parse_gpus(" 1,0 ") == (1, 0)
    for bad, why in (("2", "shows 2 GPU"), ("0,0", "distinct"), ("-1", ">= 0"),
                     ("x", "expected 'all'"), ("", "expected 'all'")):
        with pytest.raises(ValueError, match=why):
            parse_gpus(bad)
    assert [worker_gpu(slot, 2, (1, 0)) for slot in range(4)] == [1, 1, 0, 0]
    assert worker_gpu(0, 3, ()) is None
    assert pin_to_gpu(1) == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="no NVIDIA GPU"):
        parse_gpus("all")


def test_gpus_run_a_worker_group_per_gpu_on_one_port(jpeg_folder: Path) -> None:
    """No GPU here: the workers start (DALI touches no GPU before a pipeline is built),
    each pinned to its GPU, all on one port."""
    with running_server({"photos": jpeg_folder}, *FAST, "--device", "gpu", "--gpus", "all",
                        env={"CUDA_VISIBLE_DEVICES": "3,5"}) as server:
        assert server.stdout_lines[-1].endswith("(device=gpu, workers=2)")
        assert len(server.pids()) == 2
        log = server.stderr()
        assert "worker 0 (pid" in log and "runs on GPU 0 (CUDA_VISIBLE_DEVICES=3)" in log
        assert "worker 1 (pid" in log and "runs on GPU 1 (CUDA_VISIBLE_DEVICES=5)" in log
        with connect(server.address) as channel:
            listed = wire.AugmentStub(channel).ListDatasets(
                pb.ListDatasetsRequest(), timeout=10)
        assert [d.name for d in listed.datasets] == ["photos"]


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0", "--device", "cpu"], "--gpus needs --device gpu"),
    (["--gpus", "0,0"], "distinct"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--stall-timeout", "-1"], "stall_timeout"),
])
def test_bad_limits_and_gpus_are_clear_errors(args: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`augsvc serve` exits 2 with the reason before it forks or binds anything."""
    from augsvc.cli import build_parser

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    parsed = build_parser().parse_args(["serve", "--dataset", "p=/nonexistent", *args])
    assert parsed.run(parsed) == 2
    assert message in capsys.readouterr().err


def test_memory_sizes() -> None:
    from augsvc.cli.serve import _memory_size

    assert _memory_size("auto") is None
    assert _memory_size("512M") == _memory_size("512") == 512 << 20
    assert _memory_size("4G") == _memory_size("4GiB") == _memory_size("4gb") == 4 << 30
    assert _memory_size("1.5K") == 1536
    for bad in ("", "0", "-5M", "G", "many"):
        with pytest.raises(ValueError, match="--max-memory"):
            _memory_size(bad)
