"""The colour kernel's share of the engine by CPU time: (a)/(a0) on a machine shared with others.

    .venv/bin/python scripts/colour_cost.py [--dataset epoch.csv] [--seconds 60]

`augsvc bench` times (a), the full engine, and then (a0), the engine without the colour
kernel, by the wall clock, one after the other: when other processes load the machine,
each figure gets whatever CPU they leave, and the ratio swings either way. Here two
in-process `Augmenter`s (default spec, and the same with hsv and pca off; batch 64, 2 DALI
threads) run batches in turn, and each batch is charged the process's CPU time
(`time.process_time`, all threads) it took, so that the load falls on both alike. Prints
img per CPU-second for both and their ratio, the wall-clock figures beside them. Set
AUGSVC_KERNEL_LIB to compare plugin builds. Without --dataset, writes the bench's photo set
(256 images, an epoch of 2048) to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from augsvc.bench.photos import make_photo_set, repeat_manifest
from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import open_dataset
from augsvc.engine.statistics import load_stats

BATCH = 64


def measure(manifest: Path, seconds: float) -> dict[str, tuple[float, float, int]]:
    """{"a" | "a0": (img per CPU-second, img/s, images)} over `seconds` of alternating batches."""
    index = open_dataset(manifest)
    spec = AugmentSpec.alexnet()
    stats = load_stats(index, spec.stats)
    specs = {"a": spec, "a0": spec.replace(hsv=False, pca=False)}
    engines = {k: Augmenter(index, s, stats, max_batch_size=BATCH, device="cpu", num_threads=2)
               for k, s in specs.items()}
    cpu = dict.fromkeys(engines, 0.0)
    wall = dict.fromkeys(engines, 0.0)
    images = dict.fromkeys(engines, 0)
    plan = EpochPlan(len(index), BATCH, 0, 0, tail="pad")
    try:
        for engine in engines.values():  # warm-up: pipelines built
            engine.run_batch(0, 0, plan.batch(0))
        end = time.perf_counter() + seconds
        k = 1
        while time.perf_counter() < end:
            for key, engine in engines.items():
                c0, w0 = time.process_time(), time.perf_counter()
                images[key] += len(engine.run_batch(0, 0, plan.batch(k % len(plan))).images)
                cpu[key] += time.process_time() - c0
                wall[key] += time.perf_counter() - w0
            k += 1
    finally:
        for engine in engines.values():
            engine.close()
    return {key: (images[key] / cpu[key], images[key] / wall[key], images[key])
            for key in engines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, help="image folder or manifest")
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.dataset
        if manifest is None:
            make_photo_set(Path(tmp), num_images=256)
            manifest = repeat_manifest(Path(tmp), 2048)
        r = measure(manifest, args.seconds)
    (a_cpu, a_wall, n), (a0_cpu, a0_wall, _) = r["a"], r["a0"]
    print(f"(a) {a_cpu:.1f} img/cpu-s ({a_wall:.1f} img/s), (a0) {a0_cpu:.1f} img/cpu-s "
          f"({a0_wall:.1f} img/s); a/a0 by CPU time {a_cpu / a0_cpu:.3f}, by wall clock "
          f"{a_wall / a0_wall:.3f}; {n} images each")


if __name__ == "__main__":
    main()
