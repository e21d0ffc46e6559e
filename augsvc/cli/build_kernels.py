"""`augsvc build-kernels`: compile the DALI colour-kernel plugin into its cache."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `build-kernels` parser."""
    p = sub.add_parser(
        "build-kernels",
        help="compile the colour-kernel DALI plugin (CPU, and CUDA when nvcc is present)",
        description="Compile the exact HSV + fancy-PCA DALI operator plugin from kernels/ into "
        "the cache (~/.cache/augsvc/kernels, or $AUGSVC_KERNEL_CACHE), keyed by the sources, "
        "the DALI version and the compilers. Skipped when an up-to-date build is cached.",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Build, print the library path."""
    from augsvc.engine import kernels

    try:
        path = kernels.build(force=args.force)
    except kernels.KernelBuildError as exc:
        print(f"augsvc build-kernels: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
