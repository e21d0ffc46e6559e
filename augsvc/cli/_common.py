"""Options shared by several subcommands: the augmentation spec and the device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from augsvc.core.spec import AugmentSpec, SpecError


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """--preset, --spec and --set, applied in that order."""
    group = parser.add_argument_group("augmentation spec")
    group.add_argument("--preset", choices=("alexnet", "eval"), default="alexnet",
                       help="starting point: alexnet (training: random resized crop, flip, HSV "
                       "jitter, fancy PCA) or eval (centre crop only) (default: alexnet)")
    group.add_argument("--spec", metavar="JSON|FILE",
                       help="fields to change, as a JSON object or a path to a JSON file, "
                       "e.g. '{\"size\": 160, \"pca_sigma\": 0.2}'")
    group.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                       help="change one field (VALUE parsed as JSON, else as a string); "
                       "repeatable, e.g. --set p_vflip=0.5 --set crop=random_crop")


def spec_from_args(args: argparse.Namespace) -> AugmentSpec:
    """The validated spec the options describe; SpecError names a bad field."""
    base = AugmentSpec.alexnet() if args.preset == "alexnet" else AugmentSpec.eval()
    changes: dict = {}
    if args.spec:
        path = Path(args.spec)
        text = path.read_text() if path.is_file() else args.spec
        try:
            changes.update(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError("<spec>", f"--spec is neither a JSON object nor a file: {exc}") from exc
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(key, "--set needs FIELD=VALUE")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return AugmentSpec.from_dict({**base.to_dict(), **changes})


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device cpu|gpu."""
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where DALI runs: cpu, or gpu (nvJPEG decode + CUDA kernels) "
                        "(default: cpu)")
