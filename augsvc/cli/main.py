"""The `augsvc` command line: the top-level parser, one subcommand per module of `augsvc.cli`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`run=<function(args) -> int>`; heavy imports (DALI, torch) stay inside `run`, so
`augsvc --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from augsvc import __version__

COMMANDS = ("stats", "preview", "build_kernels", "serve", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="augsvc",
        description="GPU data augmentation service: DALI pipelines with exact HSV jitter and "
        "fancy-PCA lighting, streamed to trainers over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"augsvc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"augsvc.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
