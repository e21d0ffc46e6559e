"""`augsvc stats PATH`: compute a dataset's RGB statistics and store them beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BOOTSTRAP_REPLICATES = 200


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
        "uses them for fancy-PCA lighting and normalization (spec stats 'auto', the default, "
        "or 'dataset'). Writes augsvc-stats.json in the image folder (or "
        "<manifest>.augsvc-stats.json beside a manifest; for a read-only folder use --out "
        "and `augsvc serve --dataset NAME=PATH,stats=FILE`) and prints a summary with the "
        "standard error of each eigenvalue, from a bootstrap over the images used.",
    )
    p.add_argument("path", type=Path, metavar="PATH",
                   help="image folder (PATH/<class>/<image>) or CSV manifest (path,label)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="write the JSON here instead of beside the dataset")
    p.add_argument("--sample", "--max-images", dest="sample", type=_positive_int, metavar="N",
                   help="estimate from a random sample of N images (default: all; for "
                   "ImageNet-sized sets a few thousand give eigenvalues to a few percent, see "
                   "the printed standard errors); deterministic for a given --seed")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed choosing the --sample images and the bootstrap (default: 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (by default one is drawn when stderr is a terminal)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Index, compute, write, summarise; 1 with a message on a dataset or stats error."""
    from augsvc.cli.progress import progress
    from augsvc.core.stats import StatsError
    from augsvc.engine.dataset import DatasetError, open_dataset
    from augsvc.engine.statistics import compute_moments, stats_file

    try:
        index = open_dataset(args.path)
        bar = None if args.no_progress else (lambda ids: progress(ids, desc="stats"))
        moments = compute_moments(index, max_images=args.sample, progress=bar, seed=args.seed)
        result = moments.stats(str(index.source))
        stderr = moments.eigvals_stderr(BOOTSTRAP_REPLICATES, seed=args.seed)
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
    print(f"stderr    {'  '.join(f'{v:8.4f}' for v in stderr)}    (of eigvals: bootstrap over "
          f"{len(moments):,} images, {BOOTSTRAP_REPLICATES} resamples)")
    print(f"written   {out}")
    return 0
