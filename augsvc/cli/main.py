"""The `augsvc` command line: the top-level parser, one subcommand per module of `augsvc.cli`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`run=<function(args) -> int>`; heavy imports (DALI, torch) stay inside `run`, so
`augsvc --help` is instant and works with the client alone (`pip install augsvc`).
A command whose modules are not installed says which extra to install (`NEEDS`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from augsvc import __version__

COMMANDS = ("stats", "preview", "build_kernels", "serve", "health", "bench")
# what each command imports beyond the client's dependencies; all of it is the server extra
NEEDS = {
    "stats": ("PIL",),
    "preview": ("nvidia.dali", "PIL"),
    "build_kernels": ("nvidia.dali",),
    "serve": ("nvidia.dali", "PIL", "grpc_health", "grpc_reflection"),
    "health": ("grpc_health",),
    "bench": ("nvidia.dali", "PIL"),
}
SERVER_EXTRA = "pip install 'augsvc[server]'"


def missing_modules(command: str) -> list[str]:
    """The modules `command` needs that are not installed here."""
    missing = []
    for name in NEEDS.get(command, ()):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package (nvidia) is missing
            found = False
        if not found:
            missing.append(name)
    return missing


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
        command = sub.choices[name.replace("_", "-")]
        if NEEDS.get(name) and command.epilog is None:
            command.epilog = f"Needs the server extra: {SERVER_EXTRA}."
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    missing = missing_modules(args.command.replace("-", "_"))
    if missing:
        print(f"augsvc {args.command}: needs {', '.join(missing)}, which this install lacks "
              f"(the client alone has no server parts): {SERVER_EXTRA}", file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
