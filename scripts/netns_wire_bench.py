"""Delivered img/s across a network path held to a rate by tc tbf: what the wire carries.

    .venv/bin/python scripts/netns_wire_bench.py [--rates 100,1000,0] [--duration 10]

Root, iproute2 and tc. A trainer host and a server host in network namespaces on one
bridge (tests/netns.py). `augsvc serve` runs in the server host with a batch cache
(`--batch-cache-mb`) that holds every replayed batch; an `AugmentLoader` runs in the
trainer host. An untimed first pass computes `--epochs` epochs, which fills the cache;
then, for each rate, the trainer's link is held to it (tbf on both directions) and the
loader replays the cached epochs for `--duration` s, so the CPU pipeline is out of the
way and the wire and the loader are what is measured. For each rate, as many plain TCP
streams as the loader has, over the same path, give the link's TCP capacity. No netem on
this kernel: no added delay (a real link's RTT would cost more with few streams). Without
a limit both figures are bound by this machine's CPUs, not by the veth.

Columns: the tbf rate; TCP goodput measured (Python sockets) and its ceiling (tbf counts
whole Ethernet frames: 1448 payload bytes per 1514, 95.6 %); delivered img/s; the pixel
payload in Mbit/s and against both TCP figures; img/s per Gb/s of link rate. One
224x224x3 uint8 image is 150,528 bytes: raw pixels over TCP fit at most 794 img/s per
Gb/s (830 without the TCP/IP headers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the netns harness

import netns  # noqa: E402

DATASET = "bench"
TCP_PORT = 5201
MIN_IMAGES = 2048  # at least 32 batches of 64 in every figure
# TCP payload per byte tbf counts: MSS 1448 (MTU 1500, timestamps) per 1514-byte frame
TCP_EFFICIENCY = 1448 / 1514


def main() -> int:
    """Parse the arguments: run the whole bench, or one of its parts inside a namespace."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="100,1000,0",
                   help="tbf rates in Mbit/s, comma-separated; 0 = no limit (default: "
                   "100,1000,0)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per figure")
    p.add_argument("--images", type=int, default=128, help="JPEGs to generate (~500x375)")
    p.add_argument("--epochs", type=int, default=16, help="epochs computed once and replayed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="output side (uint8 RGB)")
    p.add_argument("--streams", type=int, default=2, help="loader streams")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    p.add_argument("--loader", metavar="TARGET", help=argparse.SUPPRESS)  # parts, in a netns
    p.add_argument("--fill", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tcp-source", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tcp-sink", metavar="HOST", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loader:
        print(json.dumps(replay(args)))
    elif args.tcp_source:
        tcp_source()
    elif args.tcp_sink:
        print(json.dumps({"bytes_s": tcp_sink(args.tcp_sink, args.streams, args.duration)}))
    else:
        return bench(args)
    return 0


def bench(args: argparse.Namespace) -> int:
    """Set up the hosts, fill the cache, measure every rate, print the table."""
    why = netns.unavailable("ip", "tc")
    if why:
        print(f"netns_wire_bench: cannot run here: {why}", file=sys.stderr)
        return 2
    from augsvc.engine.synth import make_dataset

    rates = [int(r) for r in args.rates.split(",")]
    image_bytes = args.size * args.size * 3
    cache_mb = args.epochs * args.images * image_bytes // 2**20 + 256
    with tempfile.TemporaryDirectory(prefix="augsvc-wire-") as tmp, \
            netns.Network(servers=1) as net, \
            netns.Cluster(net, {DATASET: make_dataset(Path(tmp), 8, -(-args.images // 8))},
                          "--batch-cache-mb", str(cache_mb), "--device", args.device,
                          "--dali-threads", "2") as cluster:
        server, trainer = net.servers[0], net.trainer
        log(f"filling the server's cache: {args.epochs} epochs of {args.images} images")
        run_json(trainer.argv(*child(args, "--loader", server.target(), "--fill")),
                 timeout=1800)
        rows = []
        for rate in rates:
            if rate:
                net.limit_rate(trainer, rate * 1_000_000)
            try:
                tcp = tcp_goodput(net, args)
                got = run_json(trainer.argv(*child(args, "--loader", server.target())),
                               timeout=args.duration + 600)
            finally:
                if rate:
                    net.remove_rate_limit(trainer)
            img_s = got["img_s"]
            payload = img_s * image_bytes * 8 / 1e6
            ceiling = rate * TCP_EFFICIENCY if rate else None
            rows.append({"rate_mbit": rate or None, "tcp_mbit": tcp * 8 / 1e6,
                         "tcp_ceiling_mbit": ceiling, "img_s": img_s, "payload_mbit": payload,
                         "payload_over_tcp": payload / (tcp * 8 / 1e6),
                         "payload_over_ceiling": payload / ceiling if ceiling else None,
                         "img_s_per_gbit": img_s / (rate / 1000) if rate else None,
                         "images": got["images"], "seconds": got["seconds"]})
            log(table(rows[-1:], header=False))
        served = cluster.served_batches(server)
    print(table(rows))
    print(f"({served} batches served; {args.size}x{args.size}x3 uint8, batch {args.batch_size}, "
          f"{args.streams} streams, replayed from the batch cache)")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))
    return 0


def child(args: argparse.Namespace, *extra: str) -> list[str]:
    """This script with the measurement arguments and `extra`, for a namespace."""
    return [sys.executable, __file__, "--duration", str(args.duration), "--images",
            str(args.images), "--epochs", str(args.epochs), "--batch-size",
            str(args.batch_size), "--size", str(args.size), "--streams", str(args.streams),
            *extra]


def run_json(cmd: list[str], timeout: float) -> dict:
    """Run a part; the JSON on its last stdout line."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def replay(args: argparse.Namespace) -> dict:
    """In the trainer host: one untimed pass over the epochs (--fill), or replay them for
    --duration s (and at least MIN_IMAGES) once the batches read ahead before the clock
    started are consumed; img/s, images and seconds."""
    from augsvc.client import AugmentLoader
    from augsvc.client.fetcher import default_readahead
    from augsvc.core.spec import AugmentSpec

    spec = AugmentSpec(size=(args.size, args.size))
    per_call = 2  # batches a call (the loader's default)
    readahead = default_readahead(args.streams, per_call)  # the loader's, for one server
    with AugmentLoader(args.loader, DATASET, spec, batch_size=args.batch_size, tail="pad",
                       streams_per_server=args.streams, batches_per_request=per_call,
                       prefetch=readahead, timeout=120) as loader:
        if args.fill:
            return {"images": sum(len(images) for images, _ in loader.epochs(args.epochs))}

        def batches():
            while True:  # every pass replays the cached epochs, read-ahead across them
                loader.set_epoch(0)
                for images, _ in loader.epochs(args.epochs):
                    yield len(images)

        with contextlib.closing(batches()) as it:
            for _ in range(readahead + 2):  # what was read ahead before we looked
                next(it)
            stamps, images = [time.perf_counter()], [0]
            while stamps[-1] - stamps[0] < args.duration or images[-1] < MIN_IMAGES:
                images.append(images[-1] + next(it))
                stamps.append(time.perf_counter())
    # the slope of images over time through every batch's arrival: a batch part-received
    # at either end of the window moves it far less than it moves (last - first) / time
    slope = float(np.polyfit(np.array(stamps) - stamps[0], images, 1)[0])
    return {"img_s": slope, "images": images[-1], "seconds": stamps[-1] - stamps[0]}


def tcp_goodput(net: netns.Network, args: argparse.Namespace) -> float:
    """Bytes/s of `--streams` plain TCP streams from the server host to the trainer host."""
    source = subprocess.Popen(net.servers[0].argv(sys.executable, __file__, "--tcp-source"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sink = child(args, "--tcp-sink", net.servers[0].address)
        return run_json(net.trainer.argv(*sink), timeout=args.duration + 60)["bytes_s"]
    finally:
        source.kill()
        source.wait(10)


def tcp_source() -> None:
    """Send zeros to every client of TCP_PORT (a thread each) until it hangs up."""
    block = bytes(1 << 20)

    def send(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                conn.sendall(block)

    with socket.create_server(("0.0.0.0", TCP_PORT)) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=send, args=(conn,), daemon=True).start()


def tcp_sink(host: str, streams: int, duration: float) -> float:
    """Receive from `streams` connections to host:TCP_PORT for 1 + `duration` s; bytes/s
    of the last `duration` s."""
    deadline = time.monotonic() + 30
    conns = []
    while len(conns) < streams:
        try:
            conns.append(socket.create_connection((host, TCP_PORT), timeout=10))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    received = [0] * streams
    start = time.perf_counter() + 1.0  # counted from 1 s in: slow start and buffers filled

    def receive(i: int) -> None:
        buf = bytearray(1 << 20)
        while (now := time.perf_counter()) - start < duration:
            n = conns[i].recv_into(buf)
            if now >= start:
                received[i] += n

    threads = [threading.Thread(target=receive, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for conn in conns:
        conn.close()
    return sum(received) / seconds


def table(rows: list[dict], header: bool = True) -> str:
    """The figures as a Markdown table."""
    def num(v: float | None, fmt: str, none: str = "-") -> str:
        return none if v is None else format(v, fmt)

    lines = ["| tbf rate Mbit/s | TCP measured Mbit/s | TCP ceiling Mbit/s | img/s "
             "| payload Mbit/s | payload / TCP measured | payload / TCP ceiling "
             "| img/s per Gb/s of link |", "|---:|---:|---:|---:|---:|---:|---:|---:|"
             ] if header else []
    for r in rows:
        lines.append(f"| {num(r['rate_mbit'], 'd', 'no limit')} | {r['tcp_mbit']:.0f} "
                     f"| {num(r['tcp_ceiling_mbit'], '.0f')} | {r['img_s']:.1f} "
                     f"| {r['payload_mbit']:.0f} | {r['payload_over_tcp']:.2f} "
                     f"| {num(r['payload_over_ceiling'], '.2f')} "
                     f"| {num(r['img_s_per_gbit'], '.0f')} |")
    return "\n".join(lines)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
