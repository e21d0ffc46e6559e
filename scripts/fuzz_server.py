"""Fuzz a real `augsvc serve` with hostile requests, then check it never crashed and recovered.

    python scripts/fuzz_server.py [--requests 10000] [--workers 1] [--threads 8] [--seed 0]
                                  [--json FILE] [--server-log FILE] [--serve-args ARGS]

Starts `augsvc serve` (CPU, loopback, port 0, `--max-batch-size 8`) on a small synthetic
dataset, sends one normal request (the warm-up: the pipeline is built), records the
server's RSS, then sends `--requests` requests from `--threads` client threads, each of
one kind drawn at random:

* bytes: random bytes to a random method (StreamBatches, GetDataset, ListDatasets,
  health Check, reflection), sent with no serializer;
* fields: a StreamBatchesRequest whose every field, spec fields included, is drawn at
  random (small, boundary and full-range integers, NaN/inf/huge floats, random strings);
* names: hostile names (1 MB, unicode, NUL, newlines, path-like, format strings) as the
  dataset, GetDataset's name, the stats source, the tail or a spec string;
* near: a valid small request with one field set to a random value (sizes up to 256);
* cancel: a valid request for every batch, cancelled after its first frame.

Then checks: no worker was restarted (the parent's log, the worker pids) and the parent
still runs; health is SERVING and a normal request returns the right batch; the RSS of
the server's processes is within 20 % of its start (after the streams end and 2 s to
settle); no call ended UNKNOWN (an exception a handler let through); SIGTERM then
stops it with exit code 0. Prints a table of
status codes per kind and the figures; `--json` writes them too. Exit code 0 if every
check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from augsvc import wire
from augsvc.core.spec import AugmentSpec
from augsvc.engine.synth import make_dataset
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

DATASET = "fuzz"
SERVICE = f"/{wire.SERVICE_NAME}"
STREAMING = {wire.STREAM_BATCHES_METHOD,
             "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}
METHODS = (wire.STREAM_BATCHES_METHOD, f"{SERVICE}/GetDataset", f"{SERVICE}/ListDatasets",
           "/grpc.health.v1.Health/Check", *sorted(STREAMING - {wire.STREAM_BATCHES_METHOD}))
KINDS = {"bytes": 0.3, "fields": 0.3, "names": 0.2, "near": 0.15, "cancel": 0.05}
SERVING = re.compile(r"^augsvc: serving \d+ dataset\(s\) on (\S+):(\d+) ")
RESTART = re.compile(r"worker \d+ \(pid \d+\) exited with|failed to start|giving up")
SMALL = AugmentSpec(size=(32, 32))
MAX_FRAMES = 64  # frames read from one call before it is cancelled
RSS_TOLERANCE = 0.20
HOSTILE = ("", "\0", "fuzz\0", "a" * 65536, "n" * (1 << 20), "../../etc/passwd", "/etc/passwd",
           "fuzz/../fuzz", "%s%s%n%x", "{0}{1!r}", "\n2026-12-01 INFO augsvc.server: FAKE",
           "\u202eevil", "é" * 5000, "😀" * 3000, "Z\u0351\u0352\u0353" * 500,
           "fuzz ", " fuzz", "FUZZ", "\x1b[31mred", "NaN", "-1")
INTS = (0, 1, 2, 3, 7, 8, 9, 255, 256, 2**31 - 1, 2**31, 2**32 - 1)


# ---------------------------------------------------------------------------
# the server


class Server:
    """A running `augsvc serve`, its stderr in a file."""

    def __init__(self, dataset: Path, workers: int, log: Path, extra: list[str]) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "augsvc", "serve", "--dataset", f"{DATASET}={dataset}",
               "--port", "0", "--device", "cpu", "--workers", str(workers),
               "--max-batch-size", "8", "--dali-threads", "1", "--io-threads", "2",
               "--grace", "1", *extra]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if match := SERVING.match(line):
                self.address = f"{match[1]}:{match[2]}"
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"augsvc serve did not start: {log.read_text(errors='replace')}")

    def pids(self) -> list[int]:
        """The parent and its live children."""
        children = []
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == self.proc.pid:
                    children.append(int(entry))
        return [self.proc.pid, *sorted(children)]

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def stop(self) -> tuple[int, float]:
        """SIGTERM to the parent, wait (SIGKILL the group after 30 s); (exit code, seconds)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return self.proc.returncode, time.monotonic() - started


# ---------------------------------------------------------------------------
# requests: (kind, method, serialized body, frames to read before cancelling)

Request = tuple[str, str, bytes, int]


def _int(rng: random.Random, bits: int) -> int:
    pick = rng.random()
    if pick < 0.5:
        return rng.choice([v for v in INTS if v < 2**bits])
    return rng.randrange(2**bits)


def _float(rng: random.Random) -> float:
    return rng.choice((0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, -1e300, float("nan"),
                       float("inf"), -float("inf"), rng.uniform(-10, 10), rng.random()))


def _string(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(HOSTILE)
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF))))
                   for _ in range(rng.randrange(0, 40)))


def _random_spec(rng: random.Random) -> pb.AugmentSpec:
    spec = pb.AugmentSpec()
    for field in spec.DESCRIPTOR.fields:
        if rng.random() < 0.5:
            continue
        if field.message_type is not None and field.message_type.name == "Range":
            getattr(spec, field.name).CopyFrom(pb.Range(lo=_float(rng), hi=_float(rng)))
        elif field.message_type is not None:  # Size
            spec.size.CopyFrom(pb.Size(height=_int(rng, 32), width=_int(rng, 32)))
        elif field.type == field.TYPE_BOOL:
            setattr(spec, field.name, rng.random() < 0.5)
        elif field.type == field.TYPE_STRING:
            setattr(spec, field.name, _string(rng))
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            setattr(spec, field.name, _float(rng))
        else:
            setattr(spec, field.name, _int(rng, 32))
    return spec


def _random_fields(rng: random.Random) -> pb.StreamBatchesRequest:
    spec = _random_spec(rng) if rng.random() < 0.5 else spec_to_proto(SMALL)
    return pb.StreamBatchesRequest(
        dataset=rng.choice((DATASET, _string(rng))), spec=spec,
        seed=_int(rng, 64), epoch=_int(rng, 64), rank=_int(rng, 32),
        world_size=_int(rng, 32), batch_size=_int(rng, 32),
        batches=[_int(rng, 32) for _ in range(rng.choice((0, 1, 3, 1000)))],
        tail=rng.choice(("", "pad", "drop_last", _string(rng))), balance=rng.random() < 0.5,
        chunk_bytes=_int(rng, 32))


def _valid(batches: list[int]) -> pb.StreamBatchesRequest:
    return pb.StreamBatchesRequest(dataset=DATASET, spec=spec_to_proto(SMALL), seed=1,
                                   batch_size=4, batches=batches)


def _near(rng: random.Random) -> pb.StreamBatchesRequest:
    request = _valid([0])
    field = rng.choice(("seed", "epoch", "rank", "world_size", "batch_size", "batches", "tail",
                        "balance", "chunk_bytes", "spec"))
    if field == "spec":
        spec = _random_spec(rng)
        spec.size.CopyFrom(pb.Size(height=rng.randint(1, 256), width=rng.randint(1, 256)))
        request.spec.MergeFrom(spec)
    elif field == "batches":
        request.batches[:] = [rng.randrange(0, 20) for _ in range(rng.randint(0, 5))]
    elif field == "tail":
        request.tail = rng.choice(("pad", "drop_last", "", _string(rng)))
    elif field == "balance":
        request.balance = True
    else:
        setattr(request, field, _int(rng, 64 if field in ("seed", "epoch") else 32))
    return request


def _hostile_name(rng: random.Random) -> Request:
    name = rng.choice(HOSTILE)
    where = rng.choice(("dataset", "get", "stats", "tail", "crop", "utf8"))
    if where == "utf8":  # field 1 (dataset / name) holding bytes that are not UTF-8
        method = rng.choice((wire.STREAM_BATCHES_METHOD, f"{SERVICE}/GetDataset"))
        return "names", method, b"\x0a\x04fu\xc3\x28", MAX_FRAMES
    if where == "get":
        body = pb.GetDatasetRequest(name=name, stats=rng.choice(("", "dataset", name)))
        return "names", f"{SERVICE}/GetDataset", body.SerializeToString(), 1
    request = _valid([0])
    if where == "dataset":
        request.dataset = name
    elif where == "tail":
        request.tail = name
    else:
        setattr(request.spec, "stats" if where == "stats" else "crop", name)
    return "names", wire.STREAM_BATCHES_METHOD, request.SerializeToString(), MAX_FRAMES


def make_request(rng: random.Random) -> Request:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    if kind == "bytes":
        method = rng.choice(METHODS)
        return kind, method, rng.randbytes(rng.choice((0, 1, 5, 50, 500, 5000))), MAX_FRAMES
    if kind == "fields":
        return kind, wire.STREAM_BATCHES_METHOD, _random_fields(rng).SerializeToString(), MAX_FRAMES
    if kind == "names":
        return _hostile_name(rng)
    if kind == "near":
        return kind, wire.STREAM_BATCHES_METHOD, _near(rng).SerializeToString(), MAX_FRAMES
    return kind, wire.STREAM_BATCHES_METHOD, _valid([]).SerializeToString(), 1


# ---------------------------------------------------------------------------
# sending


def send(channel: grpc.Channel, request: Request) -> str:
    """The call's final status code name ("OK", or "CANCELLED" for one we cancelled)."""
    _, method, body, frames = request
    try:
        if method in STREAMING:
            call = channel.unary_stream(method, request_serializer=None,
                                        response_deserializer=None)(body, timeout=60)
            for n, _ in enumerate(call, 1):
                if n >= frames:
                    call.cancel()
                    return "CANCELLED"
        else:
            channel.unary_unary(method, request_serializer=None,
                                response_deserializer=None)(body, timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def fuzz(address: str, requests: list[Request], threads: int) -> dict[str, Counter]:
    """Send every request; {kind: Counter of status codes}."""
    local = threading.local()
    channels: list[grpc.Channel] = []
    lock = threading.Lock()

    def one(request: Request) -> tuple[str, str]:
        if not hasattr(local, "channel"):
            local.channel = grpc.insecure_channel(
                address, options=wire.channel_options(own_connection=True))
            with lock:
                channels.append(local.channel)
        return request[0], send(local.channel, request)

    codes: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    with ThreadPoolExecutor(threads) as pool:
        for kind, code in pool.map(one, requests):
            codes[kind][code] += 1
    for channel in channels:
        channel.close()
    return codes


def healthy(address: str) -> bool:
    """Health SERVING and a normal request returns a full batch of the right shape."""
    with grpc.insecure_channel(address, options=wire.channel_options()) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status
        batches = list(wire.assemble(wire.AugmentStub(channel).StreamBatches(
            _valid([0, 1]), timeout=60)))
    return (status == health_pb2.HealthCheckResponse.SERVING and len(batches) == 2
            and all(b.array.shape == (4, 32, 32, 3) for b in batches))


@contextlib.contextmanager
def sampling(measure: Callable[[], float], every: float = 0.25) -> Iterator[list[float]]:
    """Samples of `measure()` every `every` s while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            samples.append(measure())

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    requests = [make_request(rng) for _ in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="augsvc-fuzz-") as tmp:
        dataset = make_dataset(Path(tmp) / "data", num_classes=4, per_class=10, size=(96, 128))
        server = Server(dataset, args.workers, Path(tmp) / "serve.stderr",
                        shlex.split(args.serve_args))
        try:
            assert healthy(server.address), "the server is not healthy before the fuzz"
            pids, log_start = server.pids(), server.log.stat().st_size
            rss_start = server.rss_mb()
            started = time.monotonic()
            with sampling(server.rss_mb) as rss:
                codes = fuzz(server.address, requests, args.threads)
            seconds = time.monotonic() - started
            ok_after = healthy(server.address)
            time.sleep(2.0)
            rss_end = server.rss_mb()
            log = server.log.read_text(errors="replace")
            if args.server_log is not None:
                args.server_log.write_text(log)
            alive, pids_after = server.proc.poll() is None, server.pids()
            exit_code, stop_seconds = server.stop()
        finally:
            if server.proc.poll() is None:
                server.stop()
    restarts = len(RESTART.findall(log))
    total = Counter()
    for counts in codes.values():
        total.update(counts)
    return {
        "requests": args.requests, "threads": args.threads, "workers": args.workers,
        "seconds": round(seconds, 1), "codes": {k: dict(v) for k, v in codes.items()},
        "unknown": total["UNKNOWN"], "worker_restarts": restarts,
        "pids_unchanged": pids == pids_after, "parent_alive": alive,
        "healthy_after": ok_after, "rss_start_mb": round(rss_start, 1),
        "rss_peak_mb": round(max(rss, default=rss_start), 1), "rss_end_mb": round(rss_end, 1),
        "rss_end_ratio": round(rss_end / rss_start, 3),
        "log_bytes": len(log.encode()) - log_start, "log_lines": log.count("\n"),
        "exit_code": exit_code, "stop_seconds": round(stop_seconds, 1),
    }


def checks(result: dict) -> dict[str, bool]:
    return {
        "0 crashes (no worker restarted, same pids, parent alive)": (
            result["worker_restarts"] == 0 and result["pids_unchanged"]
            and result["parent_alive"]),
        "0 calls ended UNKNOWN": result["unknown"] == 0,
        "healthy after (SERVING, a normal request works)": result["healthy_after"],
        f"RSS back within {RSS_TOLERANCE:.0%} of its start": (
            result["rss_end_ratio"] <= 1 + RSS_TOLERANCE),
        "stops cleanly after (SIGTERM: exit 0)": result["exit_code"] == 0,
    }


def report(result: dict, passed: dict[str, bool]) -> str:
    codes = sorted({c for v in result["codes"].values() for c in v})
    lines = [f"{'kind':<8} {'sent':>6}  " + "  ".join(codes)]
    for kind, counts in result["codes"].items():
        lines.append(f"{kind:<8} {sum(counts.values()):>6}  "
                     + "  ".join(f"{counts.get(c, 0):>{len(c)}}" for c in codes))
    lines += [
        "",
        f"{result['requests']} requests from {result['threads']} threads to "
        f"{result['workers']} worker(s) in {result['seconds']} s",
        f"RSS (server processes): start {result['rss_start_mb']} MB, peak "
        f"{result['rss_peak_mb']} MB, end {result['rss_end_mb']} MB "
        f"(x{result['rss_end_ratio']})",
        f"server log during the fuzz: {result['log_bytes']} bytes; SIGTERM after: exit "
        f"{result['exit_code']} in {result['stop_seconds']} s",
        "",
    ]
    lines += [f"[{'PASS' if ok else 'FAIL'}] {name}" for name, ok in passed.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    parser.add_argument("--serve-args", default="", metavar="ARGS",
                        help="more `augsvc serve` options, e.g. '--pipeline-cache 0'")
    parser.add_argument("--server-log", type=Path, metavar="FILE",
                        help="keep the server's stderr here")
    args = parser.parse_args(argv)
    result = run(args)
    passed = checks(result)
    result["checks"] = passed
    print(report(result, passed), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
