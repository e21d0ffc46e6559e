"""`augsvc preview`: a PNG grid of originals beside augmented draws, each labelled."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from augsvc.cli._common import add_device_option, add_spec_options, spec_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `preview` parser."""
    p = sub.add_parser(
        "preview",
        help="render a PNG grid of originals and augmented draws",
        description="Render a PNG grid: one row per image of the dataset, the original first "
        "(captioned with its file and class), then one column per augmented draw (draw d = "
        "epoch d, reproducible from --seed), captioned with its parameters: crop window, "
        "flips, hue shift, S and V power/scale/shift, PCA alpha. With --reference each draw "
        "is also rendered by the float64 numpy oracle from the same parameters (bilinear, "
        "no antialiasing), followed by the per-pixel difference from the pipeline's output "
        "(amplified 8x) and its maximum.",
    )
    p.add_argument("path", type=Path, help="image folder (root/<class>/<image>) or CSV manifest")
    p.add_argument("--out", type=Path, default=Path("preview.png"),
                   help="PNG file to write (default: preview.png)")
    p.add_argument("--images", type=int, default=4, help="rows: images to show (default: 4)")
    p.add_argument("--draws", type=int, default=4,
                   help="augmented columns per image (default: 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for picking images and drawing parameters (default: 0)")
    p.add_argument("--reference", action="store_true",
                   help="add the numpy oracle's rendering and its difference beside each draw")
    add_device_option(p)
    add_spec_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Render and save the grid."""
    from augsvc.cli.preview_grid import render_grid
    from augsvc.core.spec import SpecError
    from augsvc.core.stats import StatsError
    from augsvc.engine.dataset import DatasetError, open_dataset
    from augsvc.engine.statistics import load_stats

    try:
        spec = spec_from_args(args)
        index = open_dataset(args.path)
        stats = load_stats(index, spec.stats)
        grid = render_grid(index, spec, stats, num_images=args.images, draws=args.draws,
                           seed=args.seed, reference_column=args.reference, device=args.device)
    except (SpecError, DatasetError, StatsError, ValueError) as exc:
        print(f"augsvc preview: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height}, {args.images} images x "
          f"{args.draws} draws{' + numpy reference and difference' if args.reference else ''})")
    return 0
