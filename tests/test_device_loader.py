"""The loader's device path (`device="cuda"`) against a real `augsvc serve` on loopback.

On the CPU the delivery runs through `standin.HostTransfer` (unpinned buffers, copies
on a worker thread, late): the batches must equal the numpy loader's, whatever the
ring's size, the copies' lateness or a server killed mid-pass. The `gpu` tests run the
real CUDA path (`make gpu-check`): bytes, normalization, buffers never reused while in
use, and how much of each copy overlaps the training step (reported).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serverproc import running_server
from support import requires_gpu

from augsvc.client import AugmentLoader
from augsvc.client.output import RING_SLACK, Output
from augsvc.client.staging import StagingRing
from augsvc.client.transfer import CudaTransfer
from augsvc.core.spec import AugmentSpec

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(120)

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False, layout="NCHW")
NAME, SEED = "photos", 5


# ---------------------------------------------------------------------------
# the loader against a real server, with the CPU stand-in


@pytest.fixture(scope="module")
def server(jpeg_folder: Path):
    with running_server({NAME: jpeg_folder}) as s:
        yield s


def numpy_batches(addresses, epochs: int, **kwargs) -> list[tuple]:
    kwargs.setdefault("batch_size", 2)
    with AugmentLoader(addresses, NAME, kwargs.pop("spec", SPEC), seed=SEED,
                       return_meta=True, **kwargs) as loader:
        return list(loader.epochs(epochs))


def staged_loader(addresses, transfer, **kwargs) -> AugmentLoader:
    """A torch loader whose batches take the device path through `transfer`."""
    kwargs.setdefault("batch_size", 2)
    loader = AugmentLoader(addresses, NAME, kwargs.pop("spec", SPEC), seed=SEED,
                           output="torch", return_meta=True, **kwargs)
    loader._output.transfer = transfer
    return loader


def assert_same(got, want):
    assert len(got) == len(want)
    for (images, labels, meta), (w_images, w_labels, w_meta) in zip(got, want, strict=True):
        assert meta.index == w_meta.index
        np.testing.assert_array_equal(meta.sample_ids, w_meta.sample_ids)
        np.testing.assert_array_equal(labels.numpy(), w_labels)
        assert np.array_equal(images.numpy(), w_images), f"batch {meta.index} differs"


def test_staged_batches_equal_the_numpy_loader(server, host_transfer):
    want = numpy_batches(server.address, 3)
    transfer = host_transfer(delay=0.005)
    with staged_loader(server.address, transfer, streams_per_server=2,
                       batches_per_request=1, prefetch=4) as loader:
        got = list(loader.epochs(3))
        ring = loader._output.ring
        assert_same(got, want)
        assert transfer.starts == len(want)  # one copy per batch
        # the read-ahead plus the batches in transfer always suffice: no spare buffer
        assert ring.stats.spare == 0 and len(ring) <= loader.prefetch + RING_SLACK
        assert ring.stats.reused >= len(want) - ring.stats.made > 0
        got2 = list(loader)  # the next pass reuses the ring
        assert loader._output.ring is ring and ring.stats.made <= loader.prefetch + RING_SLACK
    assert_same(got2, numpy_batches(server.address, 1, epoch=3))
    assert loader._output.ring is None  # close() let the buffers go


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_staged_normalize_matches_the_numpy_loader(server, host_transfer, layout):
    spec = SPEC.replace(layout=layout)
    want = numpy_batches(server.address, 1, spec=spec, normalize=True)
    with staged_loader(server.address, host_transfer(), spec=spec, normalize=True) as loader:
        got = list(loader)
    assert len(got) == len(want)
    for (images, labels, _), (w_images, w_labels, _) in zip(got, want, strict=True):
        assert images.dtype == torch.float32 and images.shape == w_images.shape
        np.testing.assert_allclose(images.numpy(), w_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(labels.numpy(), w_labels)


def test_a_ring_of_one_buffer_makes_spares_for_a_full_read_ahead(server, host_transfer):
    want = numpy_batches(server.address, 2, batch_size=1)
    with staged_loader(server.address, host_transfer(delay=0.01), batch_size=1,
                       streams_per_server=2, batches_per_request=1, prefetch=4) as loader:
        ring = loader._output.ring = StagingRing(1, pin=False)
        batches = loader.epochs(2)
        fetcher = loader._fetcher
        fetcher.start()
        deadline = time.monotonic() + 60
        while not fetcher.schedule.ready(loader.prefetch - 1):  # the read-ahead is full
            assert time.monotonic() < deadline, "the read-ahead never filled"
            time.sleep(0.01)
        got = list(batches)
    assert_same(got, want)
    assert ring.stats.spare >= loader.prefetch - 1, ring.stats


def test_a_ring_of_one_buffer_waits_for_each_copy(server, host_transfer):
    """Read-ahead 1: each batch arrives while the only buffer's copy is still running
    (50 ms late), so it must wait for that copy, not overwrite what it reads."""
    want = numpy_batches(server.address, 2, batch_size=1)
    with staged_loader(server.address, host_transfer(delay=0.05), batch_size=1,
                       streams_per_server=1, batches_per_request=1, prefetch=1) as loader:
        ring = loader._output.ring = StagingRing(1, pin=False)
        got = list(loader.epochs(2))
    assert_same(got, want)
    assert ring.stats.waited > 0 and ring.stats.made <= 2, ring.stats


def test_staged_failover_keeps_the_bytes(server, jpeg_folder, host_transfer, caplog):
    """A server killed mid-pass: its streams' partial batches give their buffers back."""
    want = numpy_batches(server.address, 3, batch_size=1, epoch=2)
    with running_server({NAME: jpeg_folder}) as a:
        loader = staged_loader([a.address, server.address], host_transfer(delay=0.002),
                               batch_size=1, epoch=2, streams_per_server=2,
                               batches_per_request=2, reconnect_timeout=1.0)
        got = []
        with loader:
            for item in loader.epochs(3):
                got.append(item)
                if len(got) == 3:
                    a.kill()
            ring = loader._output.ring
            # a failed call's partial batch is held by grpc's call <-> traceback cycle in
            # the stream's frame until the collector runs: then nothing holds a buffer
            gc.collect()
            assert ring.aliased == 0
    assert_same(got, want)
    handed_back = [r.getMessage() for r in caplog.records if "handed back" in r.getMessage()]
    assert any(a.address in m for m in handed_back), handed_back


# ---------------------------------------------------------------------------
# on a GPU (make gpu-check)


def requires_cuda(test: Any) -> Any:
    """`requires_gpu`, and PyTorch must see the GPU as well."""
    return pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs PyTorch with CUDA")(requires_gpu(test))


class TimedTransfer(CudaTransfer):
    """`CudaTransfer` with timed events around each batch's copy; `sleep_cycles` first
    keeps the side stream busy (a slow DMA: copies lag far behind the host)."""

    def __init__(self, device: Any, sleep_cycles: int = 0) -> None:
        super().__init__(device)
        self.sleep_cycles, self.spans = sleep_cycles, []

    def start(self, images: Any, labels: Any, prepare: Any) -> Any:
        begin = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            begin.record(self.stream)
        inflight = super().start(images, labels, prepare)
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self.spans.append((begin, end))
        return inflight


def cuda_loader(addresses, **kwargs) -> AugmentLoader:
    kwargs.setdefault("batch_size", 2)
    return AugmentLoader(addresses, NAME, kwargs.pop("spec", SPEC), seed=SEED, output="torch",
                         device="cuda", return_meta=True, **kwargs)


@requires_cuda
def test_cuda_batches_equal_the_numpy_loader(server):
    want = numpy_batches(server.address, 3)
    with cuda_loader(server.address) as loader:
        got = [(images.cpu(), labels.cpu(), meta) for images, labels, meta in
               _on_cuda(loader.epochs(3))]
        ring = loader._output.ring
        assert ring.pin and all(s.tensor.is_pinned() for s in ring._slots.values())
        assert ring.stats.spare == 0, ring.stats
    assert_same(got, want)


def _on_cuda(batches):
    for images, labels, meta in batches:
        assert images.is_cuda and labels.is_cuda
        yield images, labels, meta


@requires_cuda
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_cuda_normalize_matches_the_numpy_loader(server, layout):
    spec = SPEC.replace(layout=layout)
    want = numpy_batches(server.address, 1, spec=spec, normalize=True)
    with cuda_loader(server.address, spec=spec, normalize=True) as loader:
        got = [(images.cpu(), labels.cpu()) for images, labels, _ in _on_cuda(loader)]
    assert len(got) == len(want)
    for (images, labels), (w_images, w_labels, _) in zip(got, want, strict=True):
        assert images.dtype == torch.float32
        np.testing.assert_allclose(images.numpy(), w_images, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(labels.numpy(), w_labels)


@requires_cuda
def test_cuda_normalize_is_one_pass_without_a_float_copy(server):
    """uint8 in, float32 out: the GPU memory it takes is the output's alone."""
    output = Output("torch", "cuda", True, "NCHW")
    with AugmentLoader(server.address, NAME, SPEC) as loader:
        info = loader.dataset_info
        x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, device="cuda")
        output._prepare(x[:1], info)  # the scale and offset, made once
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = output._prepare(x, info)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    assert y.dtype == torch.float32 and peak < 1.5 * y.nbytes, (peak, y.nbytes)


@requires_cuda
def test_cuda_slow_consumer_never_sees_a_reused_buffer(server):
    """Copies held back on the side stream, a consumer stream busy before it reads each
    batch: every batch's digest, taken on the GPU after the wait, matches the numpy one."""
    want = numpy_batches(server.address, 8, batch_size=1)
    weights = None
    sums = []
    with cuda_loader(server.address, batch_size=1, streams_per_server=2,
                     batches_per_request=1) as loader:
        device = loader._output.device
        transfer = loader._output.transfer = TimedTransfer(device, sleep_cycles=2_000_000)
        for images, _, _ in loader.epochs(8):
            torch.cuda._sleep(1_000_000)  # the training step, before it reads the batch
            if weights is None:
                weights = torch.arange(1, images[0].numel() + 1, device=device) % 251
            sums.append((images.reshape(len(images), -1).long() * weights).sum())
        got = torch.stack(sums).cpu().numpy()
        stats = loader._output.ring.stats
    w = (np.arange(1, want[0][0][0].size + 1) % 251).astype(np.int64)
    expected = np.array([(images.reshape(len(images), -1).astype(np.int64) * w).sum()
                         for images, _, _ in want])
    assert transfer.spans and len(transfer.spans) == len(want)
    np.testing.assert_array_equal(got, expected)
    assert stats.spare == 0, stats


@requires_cuda
def test_cuda_copies_overlap_the_training_step(server, capsys):
    """Reported, not asserted: how much of the copies' time the consumer's stream spent in
    a training step (0 if they ran on that stream), how many batches were copied ahead."""
    spec = SPEC.replace(size=(224, 224))
    want = numpy_batches(server.address, 30, spec=spec, batch_size=12)
    with cuda_loader(server.address, spec=spec, batch_size=12) as loader:
        transfer = loader._output.transfer = TimedTransfer(loader._output.device)
        t0 = torch.cuda.Event(enable_timing=True)
        t0.record()
        steps, got, ahead = [], [], 0
        for k, (images, labels, meta) in enumerate(loader.epochs(30)):
            ahead += len(transfer.spans) == k + 2  # batch k+1's copy issued already
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            torch.cuda._sleep(20_000_000)  # a ~10 ms training step, queued as a model's are
            end.record()
            steps.append((begin, end))
            got.append((images, labels, meta))  # held on the GPU until the end
        torch.cuda.synchronize()
        got = [(images.cpu(), labels.cpu(), meta) for images, labels, meta in got]
        stats = loader._output.ring.stats
    assert_same(got, want)

    def span(pair: tuple[Any, Any]) -> tuple[float, float]:
        return t0.elapsed_time(pair[0]), t0.elapsed_time(pair[1])

    copies, busy = [span(c) for c in transfer.spans], [span(s) for s in steps]
    copying = sum(c1 - c0 for c0, c1 in copies)
    overlap = sum(max(0.0, min(c1, s1) - max(c0, s0)) for c0, c1 in copies for s0, s1 in busy)
    copy_ms = float(np.median([c1 - c0 for c0, c1 in copies]))
    mb = want[0][0].nbytes / 1e6
    with capsys.disabled():
        print(f"\n[device loader] {len(copies)} copies of {mb:.2f} MB, median {copy_ms:.3f} ms "
              f"({mb / copy_ms:.1f} GB/s incl. labels); {overlap / max(copying, 1e-9):.0%} of "
              f"the copy time during a step (median "
              f"{np.median([s1 - s0 for s0, s1 in busy]):.2f} ms); {ahead}/{len(copies) - 1} "
              f"copies issued a batch ahead; ring {stats}")
