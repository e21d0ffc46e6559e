"""Where (b') loses to (c): the bare stream, the bare stream plus the loader's one copy, and
the loader replaying cached batches, alternated in one process against the same servers.

    python scripts/loader_copy_ab.py [--rounds 5] [--duration 6]

Rows, each round in this order (docs/benchmarks.md, "The loader's copy"):

* c       `augsvc bench`'s (c): a bare gRPC stream of raw 2 MiB chunks, bytes discarded;
* c+copy  the same stream, every chunk copied into a fresh batch array (`np.copyto`, as
          `wire.BatchAssembler` does): the least any grpcio client delivering contiguous,
          writable batches can do;
* b'      `augsvc bench`'s (b'): an `AugmentLoader` replaying the server's cached batches.

Per row: img/s, the client's core-seconds per GB received (`getrusage`, this process) and
the total with the servers (`/proc`). On a 2-core machine all three are CPU-bound, so the
total's ratio is the throughput ratio to expect without other load.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from augsvc.bench import bare, runner
from augsvc.bench.cputime import tree_cpu_seconds
from augsvc.client import AugmentLoader
from augsvc.core.spec import AugmentSpec

BATCH = 64
PAYLOAD = BATCH * 224 * 224 * 3


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(batches: Iterator[int], duration: float) -> tuple[float, float, float]:
    """(img/s, client core-s/GB, client + servers core-s/GB) after one warm-up batch."""
    next(batches)
    own, total, start, images = _own_cpu(), tree_cpu_seconds() or 0.0, time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        images += next(batches)
    seconds = time.perf_counter() - start
    own, total = _own_cpu() - own, (tree_cpu_seconds() or 0.0) - total
    batches.close()
    gb = images * PAYLOAD / BATCH / 1e9
    return images / seconds, own / gb, total / gb


def copied(address: str) -> Iterator[int]:
    """The bare stream with every chunk copied into a fresh batch array per payload."""

    def messages(i: int) -> Iterator[bytes]:
        out, pos = np.empty(0, np.uint8), 0
        with bare.channel(address) as channel:
            for message in channel.unary_stream(bare.METHOD)(b""):
                if pos == out.size:
                    out, pos = np.empty(PAYLOAD, np.uint8), 0
                end = min(pos + len(message), PAYLOAD)
                np.copyto(out[pos:end], np.frombuffer(message, np.uint8, end - pos))
                pos = end
                yield message

    for _ in bare.count_batches(2, PAYLOAD, messages):
        yield BATCH


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per row")
    args = p.parse_args()
    spec = AugmentSpec.alexnet()
    with tempfile.TemporaryDirectory() as tmp:
        data = runner._generate(Path(tmp) / "images", 256, 2048, lambda line: None)
        serve = ["-m", "augsvc", "serve", "--dataset", f"bench={data}", "--workers", "1",
                 "--dali-threads", "2", "--batch-cache-mb", "4096"]
        with runner._server(serve) as address, \
                runner._server(["-m", "augsvc.bench.bare", "--payload-bytes",
                                str(PAYLOAD)]) as bare_address, \
                AugmentLoader(address, "bench", spec, batch_size=BATCH, streams_per_server=2,
                              tail="pad", timeout=120) as loader:
            print("filling the batch cache (epoch 0) ...", file=sys.stderr, flush=True)
            sum(1 for _ in loader.epochs(1))

            def replay() -> Iterator[int]:
                while True:
                    loader.set_epoch(0)
                    for images, _ in loader.epochs(1):
                        yield len(images)

            rows = {"c": lambda: (BATCH for _ in bare.receive(bare_address, 2, PAYLOAD)),
                    "c+copy": lambda: copied(bare_address), "b'": replay}
            print("round row      img/s  client core-s/GB  total core-s/GB  load")
            for r in range(args.rounds):
                for name, batches in rows.items():
                    img_s, own, total = measure(batches(), args.duration)
                    print(f"{r:5d} {name:7s} {img_s:7.0f} {own:17.3f} {total:16.3f} "
                          f"{os.getloadavg()[0]:5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
