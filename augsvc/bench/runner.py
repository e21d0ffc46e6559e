"""`augsvc bench`: every throughput figure measured side by side, in one run, on the same images.

(a) engine   the in-process engine alone (read + params + DALI), no network
(b) service  end to end: `augsvc serve` in another process -> `AugmentLoader`
(b') loader  the same loader replaying batches the server already holds (its batch
             cache), so the pipeline is not the bottleneck: the wire plus the loader's
             copy of every chunk into its batch array
(b'') wire   the same cached batches as raw StreamBatches frames through the wire decoder,
             not assembled into arrays: what the service's wire moves
(c) bare     the transport ceiling: a bare gRPC stream of raw chunks of the same batch
             size, same streams, same loopback, nothing decoded
(d) torchvision  a DataLoader with the closest equivalent transforms (`augsvc.bench.baseline`),
             when an interpreter with torchvision is available
(e) tf.data service  TF's fast chain through one dispatcher + one worker on loopback
             (`augsvc.bench.tfdata`), when an interpreter with TensorFlow is available

(a0) plain    (a) without the colour kernel: decode + crop + flip only
(e0) tf.data  the same TF chain in-process: their engine without their wire

With `servers` (`augsvc bench --server`), only (b) runs: a loader against servers already
running (a deployment), on one of their datasets; nothing is started here.

Ratios: `augsvc.bench.report.RATIOS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from augsvc.bench.cputime import tree_cpu_seconds
from augsvc.bench.report import Figure, ratios, row
from augsvc.core.spec import AugmentSpec

if TYPE_CHECKING:
    from augsvc.core.stats import DatasetStats
    from augsvc.engine.dataset import DatasetIndex

__all__ = ["BenchConfig", "engine_batches", "run_bench"]

SERVING_LINE = re.compile(r"serving .* on (\S+):(\d+)")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run needs; defaults fit this project's 2-core CI machine."""

    spec: AugmentSpec
    dataset: Path | None = None  # None: crops of real photographs (augsvc.bench.photos)
    images: int = 256  # generated images
    epoch_images: int = 2048  # the generated set is listed repeatedly up to this epoch length
    device: str = "cpu"
    batch_size: int = 64
    duration: float = 10.0  # seconds per measurement
    threads: int = 2  # DALI threads (a) and per server worker (b); DataLoader workers (d)
    workers: int = 1  # server worker processes
    streams: int = 2  # loader streams per server
    baseline_python: str | None = None  # interpreter with torchvision; None: this one if able
    tf_python: str | None = None  # interpreter with TensorFlow; None: this one if able
    skip: tuple[str, ...] = ()  # measurement keys to leave out
    servers: tuple[str, ...] = ()  # running servers: (b) alone, against them (module docstring)
    server_dataset: str = "bench"  # the dataset of `servers` to read
    token: str | None = field(default=None, repr=False)  # for `servers` that need one
    root_certificates: Path | None = None  # PEM: `servers` speak TLS
    reconnect_timeout: float = 30.0  # `servers` unreachable this long: the run fails


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run every measurement; return {"config", "figures", "ratios", "machine"}."""
    if cfg.servers:
        log(f"[1/1] measuring b against {', '.join(cfg.servers)} (dataset "
            f"{cfg.server_dataset!r}) ...")
        figures = {"b": _remote(cfg)}
        log(f"      {row(figures['b'])}")
        return _result(cfg, None, figures)
    with tempfile.TemporaryDirectory(prefix="augsvc-bench-") as tmp:
        data = cfg.dataset or _generate(Path(tmp) / "images", cfg.images, cfg.epoch_images, log)
        figures: dict[str, Figure] = {}
        steps = [("a", _engine), ("b", _service), ("c", _bare), ("d", _torchvision),
                 ("e", _tfdata)]
        for i, (key, fn) in enumerate(steps, 1):
            if key in cfg.skip:
                continue
            log(f"[{i}/{len(steps)}] measuring {key} ...")
            for fig in fn(cfg, data):
                figures[fig.key] = fig
                log(f"      {row(fig)}")
    return _result(cfg, data, figures)


def _result(cfg: BenchConfig, data: Path | None, figures: dict[str, Figure]) -> dict:
    config = {**asdict(cfg), "spec": cfg.spec.to_dict(), "dataset": data and str(data),
              "token": "(given)" if cfg.token else None,  # never the token itself
              "root_certificates": cfg.root_certificates and str(cfg.root_certificates)}
    return {"config": config, "machine": _machine(),
            "figures": {k: asdict(f) for k, f in figures.items()}, "ratios": ratios(figures)}


# ------------------------------------------------------------------ measurements


def _engine(cfg: BenchConfig, data: Path) -> list[Figure]:
    """(a) Augmenter.run in a loop; (a0) the same without the colour kernel."""
    from augsvc.engine.dataset import open_dataset
    from augsvc.engine.statistics import load_stats

    index = open_dataset(data)
    stats = load_stats(index, cfg.spec.stats)
    plain = cfg.spec.replace(hsv=False, pca=False)
    return [
        _timed("a", "(a) engine, in-process", engine_batches(cfg, index, stats, cfg.spec),
               cfg, _image_bytes(cfg.spec)),
        _timed("a0", "(a0) engine, decode + crop + flip only",
               engine_batches(cfg, index, stats, plain), cfg, _image_bytes(cfg.spec),
               note="the full chain without HSV and fancy PCA"),
    ]


def engine_batches(cfg: BenchConfig, index: DatasetIndex, stats: DatasetStats,
                   spec: AugmentSpec) -> Generator[int, None, None]:
    """Batches of one epoch after another through an in-process Augmenter; yields each
    batch's size (also for scripts/colour_cost.py, which interleaves two of them)."""
    from augsvc.core.sampling import EpochPlan
    from augsvc.engine.augmenter import Augmenter

    engine = Augmenter(index, spec, stats, max_batch_size=cfg.batch_size, device=cfg.device,
                       num_threads=cfg.threads)
    try:
        for epoch in range(1 << 30):
            plan = EpochPlan(len(index), cfg.batch_size, 0, epoch, tail="pad")
            for k in range(len(plan)):
                yield len(engine.run_batch(0, epoch, plan.batch(k)).images)
    finally:
        engine.close()


def _service(cfg: BenchConfig, data: Path) -> list[Figure]:
    """(b) through `augsvc serve` to an AugmentLoader; (b') the same batches replayed."""
    from augsvc.client import AugmentLoader

    args = ["--workers", str(cfg.workers), "--dali-threads", str(cfg.threads),
            "--batch-cache-mb", "4096", "--device", cfg.device]
    with _server(["-m", "augsvc", "serve", "--dataset", f"bench={data}", *args]) as address:
        loader = AugmentLoader(address, "bench", cfg.spec, batch_size=cfg.batch_size,
                               streams_per_server=cfg.streams, tail="pad", timeout=120)
        with loader:
            live = (len(images) for images, _ in loader.epochs())
            b = _timed("b", "(b) service, end to end", live, cfg, _image_bytes(cfg.spec))
            epochs_done = loader.epoch  # the epoch in progress may be partial: skip it
            note = f"replays epoch(s) 0..{max(epochs_done, 1) - 1} from the server's batch cache"
            if epochs_done == 0:  # a slow machine: finish epoch 0 (untimed) so all is cached
                loader.set_epoch(0)
                filled = sum(1 for _ in loader.epochs(1))
                note += f"; (b) finished no epoch: epoch 0 ({filled} batches) completed untimed"

            def replay() -> Generator[int, None, None]:
                while True:  # one pass over the cached epochs, read-ahead across them
                    loader.set_epoch(0)
                    for images, _ in loader.epochs(max(epochs_done, 1)):
                        yield len(images)

            wire = _timed("b'", "(b') loader, cached batches", replay(), cfg,
                          _image_bytes(cfg.spec), note=note)
        frames = _timed("b''", "(b'') wire, cached frames, no assembly",
                        _frames(address, cfg, max(epochs_done, 1)), cfg, _image_bytes(cfg.spec),
                        note="protocol level: real server frames, wire.decode_frame, no copy")
    return [b, wire, frames]


def _remote(cfg: BenchConfig) -> Figure:
    """(b) against running servers: the loader end to end, epoch after epoch."""
    from augsvc.client import AugmentLoader

    loader = AugmentLoader(list(cfg.servers), cfg.server_dataset, cfg.spec,
                           batch_size=cfg.batch_size, streams_per_server=cfg.streams,
                           tail="pad", timeout=120, reconnect_timeout=cfg.reconnect_timeout,
                           token=cfg.token, root_certificates=cfg.root_certificates)
    with loader:
        fig = _timed("b", "(b) service, end to end (running servers)",
                     (len(images) for images, _ in loader.epochs()), cfg,
                     _image_bytes(cfg.spec))
        stats = loader.stats()
    fig.img_cpu_s = None  # only this client's CPU is seen: the servers run elsewhere
    shares = ", ".join(f"{address} {s.images}" for address, s in stats.servers.items())
    fig.note = (f"dataset {cfg.server_dataset!r}; images per server since start: {shares}; "
                f"waited for data {stats.wait_s:.1f} s")
    fig.extra["servers"] = {address: asdict(s) for address, s in stats.servers.items()}
    return fig


def _frames(address: str, cfg: BenchConfig, epochs: int) -> Generator[int, None, None]:
    """The cached epochs as raw StreamBatches frames over the loader's number of streams."""
    import itertools

    from augsvc import wire
    from augsvc.bench import bare as bare_stream
    from augsvc.wire._proto import augment_pb2 as pb
    from augsvc.wire.convert import spec_to_proto

    def messages(i: int) -> Iterator[object]:
        with bare_stream.channel(address) as channel:
            stub = wire.AugmentStub(channel)
            for epoch in itertools.cycle(range(epochs)):
                request = pb.StreamBatchesRequest(
                    dataset="bench", spec=spec_to_proto(cfg.spec), seed=0, epoch=epoch,
                    batch_size=cfg.batch_size, tail="pad")
                yield from stub.StreamBatches(request, timeout=600)

    payload = cfg.batch_size * _image_bytes(cfg.spec)
    for _ in bare_stream.count_batches(cfg.streams * cfg.workers, payload, messages):
        yield cfg.batch_size


def _bare(cfg: BenchConfig, data: Path) -> list[Figure]:
    """(c) raw chunks of one batch's size, as fast as grpc moves them."""
    from augsvc.bench import bare as bare_stream

    payload = cfg.batch_size * _image_bytes(cfg.spec)
    with _server(["-m", "augsvc.bench.bare", "--payload-bytes", str(payload)]) as address:
        batches = bare_stream.receive(address, streams=cfg.streams * cfg.workers,
                                payload_bytes=payload)
        return [_timed("c", "(c) bare gRPC chunk stream", (cfg.batch_size for _ in batches),
                       cfg, _image_bytes(cfg.spec))]


def _torchvision(cfg: BenchConfig, data: Path) -> list[Figure]:
    """(d) the torchvision DataLoader, in an interpreter that has torchvision."""
    fig = Figure("d", f"(d) torchvision DataLoader, {cfg.threads} workers")
    result, fig.note = _peer(
        cfg.baseline_python, "baseline.py",
        ["--data", str(data), "--batch-size", str(cfg.batch_size), "--workers",
         str(cfg.threads), "--duration", str(cfg.duration), "--size", str(cfg.spec.size[0])],
        cfg.duration + 300, "install the extra: pip install '.[baseline]' in another venv and "
        "pass --baseline-python")
    if result is not None:
        fig.img_s = result["img_s"]
        fig.mb_s = fig.img_s * _image_bytes(cfg.spec.replace(dtype="float32",
                                                             normalize=True)) / 1e6
        fig.note = f"torch {result['torch']}, torchvision {result['torchvision']}, float32 output"
        fig.extra = result
    return [fig]


TF_VENV = ("python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install 'tensorflow-cpu==2.21.*'"
           ", then pass --tf-python /tmp/tfvenv/bin/python")


def _tfdata(cfg: BenchConfig, data: Path) -> list[Figure]:
    """(e0) tf.data in-process and (e) tf.data service, in an interpreter with TensorFlow."""
    e0 = Figure("e0", f"(e0) tf.data, in-process, {cfg.threads} threads")
    e = Figure("e", "(e) tf.data service, end to end")
    result, note = _peer(
        cfg.tf_python, "tfdata.py",
        ["--data", str(data), "--batch-size", str(cfg.batch_size), "--threads",
         str(cfg.threads), "--duration", str(cfg.duration), "--size", str(cfg.spec.size[0])],
        2 * cfg.duration + 300, TF_VENV)
    e0.note = e.note = note
    if result is None:
        return [e0, e]
    bytes_per_image = cfg.spec.size[0] * cfg.spec.size[0] * 3  # uint8 out, like ours
    for fig, how in ((e0, "TF's fast chain (docs/benchmarks.md)"),
                     (e, "1 dispatcher + 1 worker process, loopback, uncompressed")):
        fig.img_s = result[fig.key]["img_s"]
        fig.mb_s = fig.img_s * bytes_per_image / 1e6
        fig.img_cpu_s = result[fig.key]["images"] / result[fig.key]["cpu_s"]
        fig.note = f"TensorFlow {result['tensorflow']}, {how}, uint8"
        fig.extra = result[fig.key]
    return [e0, e]


def _peer(python: str | None, script: str, args: list[str], timeout: float,
          install: str) -> tuple[dict | None, str]:
    """Run a peer's script (beside this module) in `python`; its JSON result, or None and
    the reason it was not measured."""
    cmd = [python or sys.executable, str(Path(__file__).with_name(script)), *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"not measured: {exc}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"not measured ({last[:120]}); {install}"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def _timed(key: str, label: str, batches: Generator[int, None, None], cfg: BenchConfig,
           bytes_per_image: int, note: str = "") -> Figure:
    """Consume `batches` (each yields its image count) for cfg.duration s after a warm-up,
    then close it (its streams stop). CPU: this process and the servers it started."""
    with contextlib.closing(batches):
        next(batches)  # warm-up: pipelines built, streams open
        cpu = [tree_cpu_seconds()]
        stamps = [time.perf_counter()]
        images = 0
        shown = stamps[0]
        tty = sys.stderr.isatty()
        while stamps[-1] - stamps[0] < cfg.duration:
            images += next(batches)
            stamps.append(time.perf_counter())
            if tty and stamps[-1] - shown > 0.25:
                shown = stamps[-1]
                elapsed = shown - stamps[0]
                sys.stderr.write(f"\r      {key}: {elapsed:4.1f}/{cfg.duration:.0f} s, "
                                 f"{images / elapsed:8.1f} img/s ")
                sys.stderr.flush()
        cpu.append(tree_cpu_seconds())
    if tty:
        sys.stderr.write("\r" + " " * 60 + "\r")
    seconds = stamps[-1] - stamps[0]
    gaps = np.diff(stamps) * 1000.0
    img_s = images / seconds
    cpu_s = cpu[1] - cpu[0] if None not in cpu else None
    return Figure(key, label, img_s=img_s, mb_s=img_s * bytes_per_image / 1e6,
                  p50_ms=float(np.percentile(gaps, 50)), p99_ms=float(np.percentile(gaps, 99)),
                  img_cpu_s=images / cpu_s if cpu_s else None,
                  note=note, extra={"images": images, "seconds": seconds,
                                    "batches": len(gaps), "cpu_s": cpu_s})


# ------------------------------------------------------------------ helpers


def _image_bytes(spec: AugmentSpec) -> int:
    h, w = spec.size
    return h * w * 3 * np.dtype(spec.dtype).itemsize


def _generate(root: Path, n: int, epoch_images: int, log: Callable[[str], None]) -> Path:
    """n crops of real photographs (`augsvc.bench.photos`), ~450 px, quality 85-95, in 8
    classes, as a CSV manifest listing them repeatedly up to `epoch_images` entries (an
    epoch is thousands of batches, and (b') replays whole cached epochs)."""
    from augsvc.bench.photos import make_photo_set, repeat_manifest

    log(f"generating {n} photo crops (longer side 400-500 px, JPEG q85-95) in {root}")
    make_photo_set(root, num_images=n)
    manifest = repeat_manifest(root, epoch_images)
    rows = manifest.read_text().count("\n") - 1
    log(f"listed in {manifest.name}: {rows} images per epoch")
    return manifest


@contextlib.contextmanager
def _server(args: list[str]) -> Iterator[str]:
    """Start `python <args> --port 0`, yield its address once it prints its serving line."""
    proc = subprocess.Popen([sys.executable, *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            match = SERVING_LINE.search(line)
            if match:
                break
            if not line and proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"server {' '.join(args)} exited: {err[-2000:]}")
        else:
            raise RuntimeError(f"server {' '.join(args)} did not start in 120 s")
        threading.Thread(target=_drain, args=(proc,), daemon=True).start()
        yield f"{match.group(1)}:{match.group(2)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _drain(proc: subprocess.Popen) -> None:
    """Keep reading the server's pipes so it never blocks on a full one."""
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            threading.Thread(target=stream.read, daemon=True).start()


def _machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "gpu": _gpu_name()}


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
