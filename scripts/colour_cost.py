"""The colour kernel's share of the engine by CPU time: (a)/(a0) on a machine shared with others.

    .venv/bin/python scripts/colour_cost.py [--dataset PATH] [--seconds 60] [--images 256]

`augsvc bench` measures (a), the full engine, and then (a0), the engine without the colour
kernel (hsv and pca off), one after the other: when other processes load the machine, each
gets whatever CPU they leave, and even their img/CPU-s moves with what runs beside them
(caches, the other hyperthread). Here the two engines of `augsvc bench` (`engine_batches`:
default spec, batch 64, 2 DALI threads, 224x224) run one batch each in turn, and each batch
is charged the CPU time this process spent on it (`time.process_time`: every thread; the
engine is synchronous, nothing runs between batches), so that the load falls on both alike.
Prints img per CPU-second of each and their ratio, the wall-clock figures beside them. Set
AUGSVC_KERNEL_LIB to compare plugin builds. Without --dataset it writes the bench's photo
set (`--images` JPEGs listed up to an epoch of 2048) to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from augsvc.bench.photos import make_photo_set, repeat_manifest
from augsvc.bench.runner import BenchConfig, engine_batches
from augsvc.core.spec import AugmentSpec
from augsvc.engine.dataset import open_dataset
from augsvc.engine.statistics import load_stats


def measure(cfg: BenchConfig, data: Path, seconds: float) -> dict[str, tuple[float, float, int]]:
    """{"a" | "a0": (img per CPU-second, img/s, images)} over `seconds` of alternating batches."""
    index = open_dataset(data)
    stats = load_stats(index, cfg.spec.stats)
    runs = {"a": engine_batches(cfg, index, stats, cfg.spec),
            "a0": engine_batches(cfg, index, stats, cfg.spec.replace(hsv=False, pca=False))}
    cpu = dict.fromkeys(runs, 0.0)
    wall = dict.fromkeys(runs, 0.0)
    images = dict.fromkeys(runs, 0)
    try:
        for batches in runs.values():  # warm-up: pipelines built, first batch run
            next(batches)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for key, batches in runs.items():
                c0, w0 = time.process_time(), time.perf_counter()
                images[key] += next(batches)
                cpu[key] += time.process_time() - c0
                wall[key] += time.perf_counter() - w0
    finally:
        for batches in runs.values():
            batches.close()
    return {key: (images[key] / cpu[key], images[key] / wall[key], images[key]) for key in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, help="image folder or manifest")
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring time")
    parser.add_argument("--images", type=int, default=256,
                        help="photo crops to generate without --dataset")
    args = parser.parse_args()
    cfg = BenchConfig(spec=AugmentSpec.alexnet())
    with tempfile.TemporaryDirectory() as tmp:
        data = args.dataset
        if data is None:
            make_photo_set(Path(tmp), num_images=args.images)
            data = repeat_manifest(Path(tmp), cfg.epoch_images)
        r = measure(cfg, data, args.seconds)
    (a_cpu, a_wall, n), (a0_cpu, a0_wall, _) = r["a"], r["a0"]
    print(f"(a) {a_cpu:.1f} img/cpu-s ({a_wall:.1f} img/s), (a0) {a0_cpu:.1f} img/cpu-s "
          f"({a0_wall:.1f} img/s); a/a0 by CPU time {a_cpu / a0_cpu:.3f}, by wall clock "
          f"{a_wall / a0_wall:.3f}; {n} images each")


if __name__ == "__main__":
    main()
