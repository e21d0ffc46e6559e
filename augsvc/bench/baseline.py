"""The torchvision baseline of `augsvc bench`: a DataLoader with the closest equivalent chain.

RandomResizedCrop -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4, 0.4, 0.1) ->
ToImage/ToDtype -> Normalize, PIL decoding in `workers` DataLoader processes. It
imports nothing from augsvc, so another interpreter (one with torchvision, see
`augsvc bench --baseline-python`) can run it as a script:

    python augsvc/bench/baseline.py --data DIR --batch-size 64 --workers 2 --duration 10

and it prints one JSON line: {"img_s": ..., "images": ..., "seconds": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXTENSIONS = (".jpg", ".jpeg", ".png")


def run(data: Path, batch_size: int, workers: int, duration: float, size: int) -> dict:
    """Iterate the DataLoader for about `duration` seconds (after one warm-up batch)."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    files = _files(data)
    if not files:
        raise SystemExit(f"no images under {data}")
    transform = v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])

    class Folder(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files) * 1000  # cycle: the run is bounded by time, not by epochs

        def __getitem__(self, i: int):
            with Image.open(files[i % len(files)]) as im:
                return transform(im.convert("RGB")), 0

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(Folder(), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # workers started, first batch ready
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        x, _ = next(it)
        images += len(x)
    seconds = time.perf_counter() - start
    return {"img_s": images / seconds, "images": images, "seconds": seconds,
            "workers": workers, "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__, "cpus": os.cpu_count()}


def _files(data: Path) -> list[Path]:
    """The images of a folder (searched deeply) or of a CSV manifest (its `path` column)."""
    if data.is_file():
        import csv

        with open(data, newline="") as fh:
            return [data.parent / row["path"] for row in csv.DictReader(fh)]
    return sorted(p for p in data.rglob("*") if p.suffix.lower() in EXTENSIONS)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print the result as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="folder of images (searched deeply) or CSV manifest (path,label)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to measure")
    p.add_argument("--size", type=int, default=224, help="output side")
    args = p.parse_args(argv)
    print(json.dumps(run(args.data, args.batch_size, args.workers, args.duration, args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
