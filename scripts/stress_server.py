"""Stress figures for `augsvc serve` (issue 9): a stream flood, many loaders, a soak.

    python scripts/stress_server.py flood   [--streams 2000]
    python scripts/stress_server.py loaders [--loaders 16 --workers 2 --seconds 60]
    python scripts/stress_server.py soak    [--minutes 30 --loaders 2] [--tracemalloc]
    python scripts/stress_server.py cpu     [--batches 40]

Each prints a table (and `--json FILE` writes the figures). Real servers on loopback,
real JPEGs (photo-like, ~500x375, written to a temporary folder).

* flood: opens `--streams` StreamBatches calls at once on `augsvc serve` (1 worker,
  default --max-streams 64) and never reads them; times from the first call to the first
  and the last RESOURCE_EXHAUSTED, the worker's peak thread count, and health checks
  made during the flood.
* loaders: `--loaders` AugmentLoader processes on one `--workers N` server for
  `--seconds`; per-loader images/s, min/max, and the server's peak RSS (all processes).
* soak: an in-process server (`start_server`, the code a worker runs) under `--loaders`
  loader processes for `--minutes`; RSS of the server and the loaders every 10 s, their
  slopes, and at the end the server's RSS after `malloc_trim` and, with --tracemalloc,
  the Python allocations that grew the most.
* cpu: one loader (2 streams) on `augsvc serve` (1 worker, 2 DALI threads) for
  `--batches` batches after a warm-up: images/s, and the CPU seconds the worker and the
  loader spent per 1000 images, a figure a machine loaded by other work changes less.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serverproc import connections_per_worker  # the tests' /proc helper

SERVING = re.compile(r"serving \d+ dataset\(s\) on (\S+):(\d+)")
SPEC = {"size": (224, 224)}  # the alexnet preset otherwise
SERVER_LOG = [os.devnull]  # where `augsvc serve` logs (--server-log)


# ------------------------------------------------------------------ helpers


def status_field(pid: int, name: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads), 0 if the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    out.append(int(entry))
    return out


@contextlib.contextmanager
def server(dataset: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`augsvc serve` on an ephemeral loopback port: (address, process)."""
    cmd = [sys.executable, "-m", "augsvc", "serve", "--dataset", f"photos={dataset}",
           "--port", "0", "--device", "cpu", *args]
    with open(SERVER_LOG[0], "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = SERVING.search(line)
            if match:
                break
        else:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.wait()}")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield f"{match.group(1)}:{match.group(2)}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_images(root: Path, n: int) -> Path:
    from augsvc.engine.synth import make_dataset

    return make_dataset(root, num_classes=8, per_class=max(1, n // 8))


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    t, v = np.array(samples).T
    return float(np.polyfit(t / 60.0, v, 1)[0]) if len(samples) > 2 else float("nan")


def table(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


# ------------------------------------------------------------------ flood


def flood(args: argparse.Namespace, data: Path) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from augsvc import wire
    from augsvc.core.spec import AugmentSpec
    from augsvc.wire._proto import augment_pb2 as pb
    from augsvc.wire.convert import spec_to_proto

    request = pb.StreamBatchesRequest(dataset="photos", spec=spec_to_proto(
        AugmentSpec(**SPEC)), seed=1, batch_size=32, batches=list(range(8)) * 100)
    with server(data) as (address, proc):
        (worker,) = children(proc.pid)
        channels = [grpc.insecure_channel(address, options=wire.channel_options(
            own_connection=True)) for _ in range(args.channels)]
        stubs = [wire.AugmentStub(c) for c in channels]
        for stub in stubs:  # connect first: the flood is of calls, not of connections
            stub.ListDatasets(pb.ListDatasetsRequest(), timeout=30)
        base_threads = status_field(worker, "Threads")
        opened: list[float] = []
        latency: list[float] = []  # seconds from opening a call to its RESOURCE_EXHAUSTED
        finished: list[float] = []
        lock = threading.Lock()
        peak = [base_threads]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], status_field(worker, "Threads"))

        def done(i: int, call: grpc.Future) -> None:
            now = time.monotonic()
            if call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                with lock:
                    latency.append(now - opened[i])
                    finished.append(now)

        health = health_pb2_grpc.HealthStub(channels[0])
        health_ms: list[float] = []

        def probe() -> None:
            while not stop.wait(0.1):
                t = time.monotonic()
                with contextlib.suppress(grpc.RpcError):
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    health_ms.append((time.monotonic() - t) * 1e3)

        threads = [threading.Thread(target=f, daemon=True) for f in (sample, probe)]
        for t in threads:
            t.start()
        start = time.monotonic()
        calls = []
        for i in range(args.streams):
            opened.append(time.monotonic())
            call = stubs[i % len(stubs)].StreamBatches(request, timeout=120)
            call.add_done_callback(lambda c, i=i: done(i, c))
            calls.append(call)
        open_s = time.monotonic() - start
        deadline = start + 60
        expected = args.streams - 64
        while len(latency) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1)
        stop.set()
        statuses = Counter(c.code().name if c.done() else "running" for c in calls)
        for call in calls:
            call.cancel()
        for c in channels:
            c.close()
    lat = np.array(latency) if latency else np.array([np.nan])
    out = {
        "streams opened": args.streams,
        "seconds the client took to open them": open_s,
        "refused (RESOURCE_EXHAUSTED)": len(latency),
        "refusal latency p50 / p99 / max (s)":
            " / ".join(f"{np.percentile(lat, q):.2f}" for q in (50, 99, 100)),
        "seconds from the first call to the last refusal":
            (max(finished) - start) if finished else None,
        "worker threads before / peak": f"{base_threads} / {peak[0]}",
        "health checks during the flood": len(health_ms),
        "health check ms, p50 / max": (f"{np.median(health_ms):.0f} / {max(health_ms):.0f}"
                                       if health_ms else None),
        "statuses": dict(statuses),
    }
    table(list(out.items()))
    return out


# ------------------------------------------------------------------ loaders


def _loader(address: str, seconds: float, batch_size: int, results: multiprocessing.Queue,
            start_at: float) -> None:
    """Count the images received in the wall-clock window [start_at, start_at + seconds],
    the same window for every loader."""
    from augsvc.client import AugmentLoader
    from augsvc.core.spec import AugmentSpec

    with AugmentLoader(address, "photos", AugmentSpec(**SPEC), batch_size=batch_size,
                       timeout=120) as loader:
        images = 0
        for _, labels in loader.epochs(None):
            now = time.time()
            if now > start_at + seconds:
                break
            if now >= start_at:
                images += len(labels)
        results.put((os.getpid(), images / seconds))


def loaders(args: argparse.Namespace, data: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    extra = ["--dali-threads", str(args.dali_threads)] if args.dali_threads else []
    with server(data, "--workers", str(args.workers), *extra) as (address, proc):
        start_at = time.time() + 30  # every loader warmed up and streaming by then
        procs = [ctx.Process(target=_loader, args=(address, args.seconds, args.batch_size,
                                                   results, start_at))
                 for _ in range(args.loaders)]
        for p in procs:
            p.start()
        peak = 0
        spread: dict[int, list[int]] = {}
        pids = [proc.pid, *children(proc.pid)]
        marks, cpu_at = (start_at, start_at + args.seconds), []  # server CPU s at both
        while any(p.is_alive() for p in procs):
            peak = max(peak, sum(status_field(pid, "VmRSS") for pid in pids))
            if len(cpu_at) < 2 and time.time() >= marks[len(cpu_at)]:
                cpu_at.append(sum(cpu_ticks(pid) for pid in pids[1:]))
            time.sleep(0.5)
            if not spread and time.time() > start_at + args.seconds / 2:
                workers = children(proc.pid)
                port = int(address.rsplit(":", 1)[1])
                spread = {p.pid: connections_per_worker(p.pid, workers, port) for p in procs}
        rates = dict(results.get(timeout=10) for _ in procs)
    for pid in sorted(rates, key=rates.get):
        print(f"  loader {pid}: {rates[pid]:6.1f} img/s, connections per worker "
              f"{spread.get(pid)}")
    rates = sorted(rates.values())
    out = {
        "loaders": args.loaders, "server workers": args.workers, "seconds": args.seconds,
        "batch size": args.batch_size,
        "img/s per loader, min": rates[0], "img/s per loader, max": rates[-1],
        "min/max": rates[0] / rates[-1], "img/s, all loaders": sum(rates),
        "server peak RSS, all processes (MiB)": peak / 1024,
        "server CPU s per 1000 images": (1000 * (cpu_at[1] - cpu_at[0])
                                         / (sum(rates) * args.seconds)
                                         if len(cpu_at) == 2 else None),
        "load average (1 min)": os.getloadavg()[0],
    }
    table(list(out.items()))
    return out


# ------------------------------------------------------------------ soak


def _soak_loader(address: str, batch_size: int) -> None:
    from augsvc.client import AugmentLoader
    from augsvc.core.spec import AugmentSpec

    with AugmentLoader(address, "photos", AugmentSpec(**SPEC), batch_size=batch_size,
                       timeout=120) as loader:
        for _ in loader.epochs(None):
            pass


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def soak(args: argparse.Namespace, data: Path) -> dict:
    import tracemalloc

    from augsvc.server import ServerConfig, start_server

    if args.tracemalloc:
        tracemalloc.start(8)
    config = ServerConfig(datasets={"photos": data}, port=0, device="cpu")
    srv = start_server(config)
    address = f"127.0.0.1:{srv.port}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_soak_loader, args=(address, args.batch_size), daemon=True)
             for _ in range(args.loaders)]
    for p in procs:
        p.start()
    me = os.getpid()
    server_mb: list[tuple[float, float]] = []
    loader_mb: list[tuple[float, float]] = []
    start = time.monotonic()
    first_snapshot = None
    try:
        while (now := time.monotonic() - start) < args.minutes * 60:
            server_mb.append((now, status_field(me, "VmRSS") / 1024))
            loader_mb.append((now, max(status_field(p.pid, "VmRSS") for p in procs) / 1024))
            if args.tracemalloc and first_snapshot is None and now > args.warmup:
                first_snapshot = tracemalloc.take_snapshot()
            print(f"{now / 60:6.1f} min  server {server_mb[-1][1]:8.1f} MiB  "
                  f"loader {loader_mb[-1][1]:8.1f} MiB", flush=True)
            time.sleep(10)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(30)
    srv.servicer.drain(30)
    time.sleep(3)  # the watchdog's release after the last stream, where the server has one
    rss_idle = status_field(me, "VmRSS") / 1024
    _malloc_trim()
    rss_trimmed = status_field(me, "VmRSS") / 1024
    growth = []
    if first_snapshot is not None:
        stats = tracemalloc.take_snapshot().compare_to(first_snapshot, "traceback")
        growth = [(str(s.traceback[-1]), s.size_diff) for s in stats[:8]]
    srv.shutdown(grace=0)
    steady = [(t, v) for t, v in server_mb if t >= args.warmup]
    steady_loader = [(t, v) for t, v in loader_mb if t >= args.warmup]
    out = {
        "minutes": args.minutes, "loaders": args.loaders, "batch size": args.batch_size,
        f"server RSS at {args.warmup:.0f} s (MiB)": steady[0][1] if steady else None,
        "server RSS at the end (MiB)": server_mb[-1][1],
        "server RSS slope after warm-up (MiB/min)": slope_mb_per_min(steady),
        "server RSS slope, second half (MiB/min)": slope_mb_per_min(
            server_mb[len(server_mb) // 2 :]),
        "loader RSS slope after warm-up (MiB/min)": slope_mb_per_min(steady_loader),
        "server RSS idle after the loaders stopped (MiB)": rss_idle,
        "server RSS after malloc_trim (MiB)": rss_trimmed,
        "tracemalloc: traced MiB at the end": (tracemalloc.get_traced_memory()[0] / 2**20
                                               if args.tracemalloc else None),
    }
    table(list(out.items()))
    for where, diff in growth:
        print(f"  tracemalloc growth {diff / 1024:+10.1f} KiB  {where}")
    out["tracemalloc growth (bytes, top)"] = growth
    out["server RSS samples (s, MiB)"] = server_mb
    out["loader RSS samples (s, MiB)"] = loader_mb
    return out


# ------------------------------------------------------------------ cpu


def cpu_ticks(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu(args: argparse.Namespace, data: Path) -> dict:
    from augsvc.client import AugmentLoader
    from augsvc.core.spec import AugmentSpec

    with server(data, "--dali-threads", "2") as (address, proc), AugmentLoader(
            address, "photos", AugmentSpec(**SPEC), batch_size=args.batch_size,
            timeout=120) as loader:
        (worker,) = children(proc.pid)
        batches = loader.epochs(None)
        for _ in range(3):
            next(batches)  # warm-up: pipeline built, streams open
        t0, w0, l0 = time.monotonic(), cpu_ticks(worker), cpu_ticks(os.getpid())
        images = sum(len(next(batches)[1]) for _ in range(args.batches))
        seconds = time.monotonic() - t0
        worker_s, loader_s = cpu_ticks(worker) - w0, cpu_ticks(os.getpid()) - l0
    out = {"images": images, "img/s": images / seconds,
           "worker CPU s per 1000 images": 1000 * worker_s / images,
           "loader CPU s per 1000 images": 1000 * loader_s / images,
           "load average (1 min)": os.getloadavg()[0]}
    table(list(out.items()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("flood", "loaders", "soak", "cpu"))
    parser.add_argument("--streams", type=int, default=2000, help="flood: calls opened")
    parser.add_argument("--channels", type=int, default=20, help="flood: connections")
    parser.add_argument("--loaders", type=int, default=None,
                        help="loader processes (default: 16 for loaders, 2 for soak)")
    parser.add_argument("--workers", type=int, default=2, help="loaders: server workers")
    parser.add_argument("--dali-threads", type=int, default=0,
                        help="loaders: DALI threads per pipeline (default: the server's)")
    parser.add_argument("--seconds", type=float, default=60.0, help="loaders: measured time")
    parser.add_argument("--minutes", type=float, default=30.0, help="soak: duration")
    parser.add_argument("--batches", type=int, default=40, help="cpu: batches measured")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="soak: seconds left out of the slopes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tracemalloc", action="store_true", help="soak: trace allocations")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--server-log", default=os.devnull, help="augsvc serve's stderr")
    args = parser.parse_args()
    SERVER_LOG[0] = args.server_log
    if args.loaders is None:
        args.loaders = 16 if args.what == "loaders" else 2
    with tempfile.TemporaryDirectory(prefix="augsvc-stress-") as tmp:
        data = make_images(Path(tmp) / "images", args.images)
        out = {"flood": flood, "loaders": loaders, "soak": soak, "cpu": cpu}[args.what](args, data)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
