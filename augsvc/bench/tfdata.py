"""The tf.data peer of `augsvc bench`: (e0) tf.data in-process, (e) tf.data service on loopback.

TF's idiomatic fast chain, per image: `tf.io.read_file` -> `tf.image.
sample_distorted_bounding_box` (area (0.08, 1), ratio (3/4, 4/3), 10 attempts, the
whole image as fallback) -> `tf.io.decode_and_crop_jpeg` (only the window is decoded)
-> `tf.image.resize` to size x size (bilinear, not antialiased: TF's default) ->
`random_flip_left_right` -> `random_hue(0.1)` -> `random_saturation(0.7, 1.4)` ->
`random_brightness(0.1)` on [0, 1] floats -> clip, round, uint8; then `batch`
(drop_remainder) and `prefetch`, `threads` threads for tf.data (private thread pool
and parallel map). (e) runs the same dataset through `tf.data.experimental.service`:
one dispatcher and one worker in another process (this script with `--serve`), the
client in this one, elements sent uncompressed over loopback gRPC.

It imports nothing from augsvc, so an interpreter with TensorFlow (see `augsvc bench
--tf-python`) runs it as a script:

    python augsvc/bench/tfdata.py --data MANIFEST --batch-size 64 --threads 2 --duration 10

and it prints one JSON line: {"e0": {"img_s": ...}, "e": {"img_s": ...}, "tensorflow": ...}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

EXTENSIONS = (".jpg", ".jpeg")


def _files(data: Path) -> list[str]:
    """The JPEGs of a folder (searched deeply) or of a CSV manifest (its `path` column)."""
    if data.is_file():
        with open(data, newline="") as fh:
            return [str(data.parent / row["path"]) for row in csv.DictReader(fh)]
    return sorted(str(p) for p in data.rglob("*") if p.suffix.lower() in EXTENSIONS)


def dataset(files: list[str], batch_size: int, threads: int, size: int):
    """The tf.data pipeline of TF's fast chain, endless (shuffled, repeated)."""
    import tensorflow as tf

    def augment(path: tf.Tensor) -> tf.Tensor:
        data = tf.io.read_file(path)
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.io.extract_jpeg_shape(data), bounding_boxes=tf.zeros([1, 0, 4]),
            min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, [size, size]) / 255.0  # bilinear, float32
        image = tf.image.random_flip_left_right(image)
        image = tf.image.random_hue(image, 0.1)
        image = tf.image.random_saturation(image, 0.7, 1.4)
        image = tf.image.random_brightness(image, 0.1)
        return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files)).repeat()
    ds = ds.map(augment, num_parallel_calls=threads)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    return ds.with_options(options)


def _timed(batches, duration: float, server: int | None = None) -> dict:
    """Consume `batches` for `duration` s after one warm-up batch; CPU seconds of this
    process and of the `server` process, if any, meanwhile."""
    it = iter(batches)
    first = next(it)
    shape = tuple(int(d) for d in first.shape)
    cpu0, images, start = _cpu(server), 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        images += int(next(it).shape[0])
    seconds, cpu_s = time.perf_counter() - start, _cpu(server) - cpu0
    return {"img_s": images / seconds, "images": images, "seconds": seconds, "cpu_s": cpu_s,
            "shape": shape, "dtype": first.dtype.name}


def _cpu(pid: int | None) -> float:
    """User + system seconds of this process, plus those of `pid` (from /proc)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    if pid is None:
        return own.ru_utime + own.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        ticks = f.read().rsplit(")", 1)[1].split()[11:13]
    return own.ru_utime + own.ru_stime + sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")


def serve(threads: int) -> int:
    """One dispatcher and one worker on loopback ports; print the dispatcher's address and
    serve until stdin closes."""
    import tensorflow as tf

    _limit_threads(tf, threads)
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://", 1)[1]
    worker = service.WorkerServer(service.WorkerConfig(dispatcher_address=address, port=0))
    print(json.dumps({"dispatcher": dispatcher.target}), flush=True)
    sys.stdin.read()  # the client closes our stdin (or dies) when it is done
    del worker
    return 0


def _limit_threads(tf, threads: int) -> None:
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)


def run(data: Path, batch_size: int, threads: int, duration: float, size: int,
        modes: tuple[str, ...]) -> dict:
    """Measure the chosen modes: "e0" in-process, "e" through tf.data service."""
    import tensorflow as tf

    _limit_threads(tf, threads)
    files = _files(data)
    if not files:
        raise SystemExit(f"no JPEGs under {data}")
    result: dict = {"tensorflow": tf.__version__, "threads": threads, "cpus": os.cpu_count()}
    if "e0" in modes:
        result["e0"] = _timed(dataset(files, batch_size, threads, size), duration)
    if "e" in modes:
        cmd = [sys.executable, __file__, "--serve", "--threads", str(threads)]
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ports = json.loads(server.stdout.readline())
            remote = dataset(files, batch_size, threads, size).apply(
                tf.data.experimental.service.distribute(
                    processing_mode="parallel_epochs", service=ports["dispatcher"],
                    compression=None))
            result["e"] = {**_timed(remote, duration, server.pid), **ports}
        finally:
            server.stdin.close()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print the result as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="folder of JPEGs (searched deeply) or CSV "
                   "manifest (path,label)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="tf.data threads")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--modes", default="e0,e", help="e0 (in-process), e (tf.data service)")
    p.add_argument("--serve", action="store_true", help="(internal) run the dispatcher and "
                   "worker until stdin closes")
    args = p.parse_args(argv)
    if args.serve:
        return serve(args.threads)
    if args.data is None:
        p.error("--data is required")
    modes = tuple(m for m in args.modes.split(",") if m)
    print(json.dumps(run(args.data, args.batch_size, args.threads, args.duration, args.size,
                         modes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
