"""`augsvc stats PATH`: compute a dataset's RGB statistics and store them beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `stats` parser."""
    p = sub.add_parser(
        "stats",
        help="compute a dataset's RGB mean, std, covariance and PCA eigenbasis",
        description="Decode the images of a dataset and compute the mean, standard deviation, "
        "3x3 covariance and its eigenbasis of their RGB pixels (scaled to [0, 1]); the server "
        "uses them for fancy-PCA lighting and normalization when a request asks for "
        "stats='dataset'. Writes augsvc-stats.json in the image folder (or "
        "<manifest>.augsvc-stats.json beside a manifest) and prints a summary.",
    )
    p.add_argument("path", type=Path, metavar="PATH",
                   help="image folder (PATH/<class>/<image>) or CSV manifest (path,label)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="write the JSON here instead of beside the dataset")
    p.add_argument("--max-images", type=_positive_int, metavar="N",
                   help="use a random subset of N images (default: all); deterministic "
                   "for a given --seed")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed choosing the --max-images subset (default: 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (by default one is drawn when stderr is a terminal)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Index, compute, write, summarise; 1 with a message on a dataset or stats error."""
    from augsvc.cli.progress import progress
    from augsvc.core.stats import StatsError
    from augsvc.engine.dataset import DatasetError, open_dataset
    from augsvc.engine.statistics import compute_stats, stats_file

    try:
        index = open_dataset(args.path)
        bar = None if args.no_progress else (lambda ids: progress(ids, desc="stats"))
        result = compute_stats(index, max_images=args.max_images, progress=bar, seed=args.seed)
        out = args.out if args.out is not None else stats_file(index)
        result.save(out)
    except (DatasetError, StatsError) as exc:
        print(f"augsvc stats: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"augsvc stats: cannot write the statistics: {exc} (try --out FILE)",
              file=sys.stderr)
        return 1
    print(f"dataset   {index.source}: {len(index):,} images, {len(index.classes)} classes, "
          f"{len(index.rejected)} rejected")
    print(result.summary())
    print(f"written   {out}")
    return 0
