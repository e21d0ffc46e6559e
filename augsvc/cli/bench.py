"""`augsvc bench`: engine, service, wire, bare transport, torchvision and tf.data, side by side."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from augsvc.cli._common import add_device_option, add_spec_options, spec_from_args
from augsvc.cli.serve import TOKEN_ENV

MEASUREMENTS = ("a", "b", "c", "d", "e")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` parser."""
    p = sub.add_parser(
        "bench",
        help="measure throughput: engine, service, wire, bare gRPC, torchvision, tf.data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure, in one run on the same images:\n"
        "  (a)  the in-process engine (read + parameters + DALI), no network\n"
        "  (b)  end to end through `augsvc serve` (another process) to an AugmentLoader,\n"
        "       with the interval between batches at the loader (p50/p99)\n"
        "  (b') the same loader replaying batches from the server's batch cache (the\n"
        "       pipeline out of the way): the wire plus the loader's copy into batches\n"
        "  (b'') the same cached batches as raw frames through the wire decoder, no\n"
        "       assembly into arrays: what the wire moves\n"
        "  (c)  a bare gRPC stream of raw chunks of the same batch size (transport ceiling)\n"
        "  (d)  torchvision's DataLoader with RandomResizedCrop, RandomHorizontalFlip,\n"
        "       ColorJitter and Normalize, as many worker processes as --threads\n"
        "  (e)  tf.data service on loopback (one dispatcher + one worker process) with\n"
        "       TF's fast chain: decode_and_crop_jpeg of a sampled crop, resize, flip,\n"
        "       random hue/saturation/brightness (docs/benchmarks.md lists the differences)\n"
        "  (a0) the engine without the colour kernel (decode + crop + flip)\n"
        "  (e0) the same tf.data chain in-process\n"
        "and print the ratios (a)/(a0), (b)/(a), (b)/(c), (b')/(c), (b'')/(c), (a)/(d),\n"
        "(b)/(e) and (a)/(e0), each with its target.\n\n"
        "With --server, only (b) runs: a loader against servers that are already running\n"
        "(a deployment), on their dataset --server-dataset, with the spec, batch size and\n"
        "streams given here; nothing is started, and the local options (--dataset,\n"
        "--images, --workers, --threads, the peers, --skip) do not apply.",
    )
    p.add_argument("--dataset", type=Path, default=None, metavar="PATH",
                   help="image folder or manifest to use (default: crops of real photographs, "
                   "longer side 400-500 px, JPEG quality 85-95, ImageNet-like, written to a "
                   "temporary folder; see augsvc.bench.photos)")
    p.add_argument("--images", type=int, default=256,
                   help="images to generate when --dataset is not given (default: 256)")
    p.add_argument("--epoch-images", type=int, default=2048,
                   help="the generated set is listed repeatedly up to this many images per "
                   "epoch (default: 2048)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--size", type=int, default=224, help="output side in pixels (default: 224)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds per measurement, after a warm-up batch (default: 10)")
    p.add_argument("--threads", type=int, default=2,
                   help="DALI threads for (a) and per server worker for (b); DataLoader "
                   "workers for (d) (default: 2)")
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes for (b) (default: 1)")
    p.add_argument("--streams", type=int, default=2,
                   help="loader streams per server worker (b) and bare streams per worker "
                   "(c) (default: 2)")
    p.add_argument("--baseline-python", metavar="PYTHON",
                   help="interpreter with torch + torchvision for (d) (default: this one; "
                   "(d) is skipped with a note when it lacks torchvision)")
    p.add_argument("--tf-python", metavar="PYTHON",
                   help="interpreter with TensorFlow for (e0)/(e) (default: this one; they are "
                   "skipped with a note when it lacks TensorFlow). One line makes one: "
                   "python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install "
                   "'tensorflow-cpu==2.21.*'")
    remote = p.add_argument_group("against running servers")
    remote.add_argument("--server", action="append", default=[], metavar="HOST[:PORT]",
                        help="measure (b) alone against this running server (repeatable; a "
                        "name is resolved to every address, like AugmentLoader's targets)")
    remote.add_argument("--server-dataset", metavar="NAME",
                        help="the dataset to read on --server (required with it)")
    remote.add_argument("--token-file", type=Path, metavar="FILE",
                        help="bearer token for --server: the file's last line (default: "
                        f"${TOKEN_ENV})")
    remote.add_argument("--root-cert", type=Path, metavar="PEM",
                        help="--server speaks TLS: trust this CA certificate")
    p.add_argument("--skip", action="append", default=[], choices=MEASUREMENTS,
                   help="leave a measurement out (repeatable)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write a bar chart")
    add_device_option(p)
    add_spec_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the bench, print the table, write JSON and the plot if asked."""
    from augsvc import AugsvcError, bench
    from augsvc.core.spec import SpecError

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of measuring)
        except ImportError as exc:
            print(f"augsvc bench: --plot needs matplotlib ({exc}); pip install matplotlib",
                  file=sys.stderr)
            return 2
    try:
        spec = spec_from_args(args)
        if args.size:
            spec = spec.replace(size=(args.size, args.size))
        token = _remote_options(args)
    except (SpecError, ValueError) as exc:
        print(f"augsvc bench: {exc}", file=sys.stderr)
        return 2
    cfg = bench.BenchConfig(
        spec=spec, dataset=args.dataset, images=args.images, epoch_images=args.epoch_images,
        device=args.device,
        batch_size=args.batch_size, duration=args.duration, threads=args.threads,
        workers=args.workers, streams=args.streams, baseline_python=args.baseline_python,
        tf_python=args.tf_python, skip=tuple(args.skip), servers=tuple(args.server),
        server_dataset=args.server_dataset or "bench", token=token,
        root_certificates=args.root_cert,
    )
    try:
        result = bench.run_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    except AugsvcError as exc:  # --server: unreachable, refused, or no such dataset
        print(f"augsvc bench: {exc}", file=sys.stderr)
        return 2
    print(bench.format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _remote_options(args: argparse.Namespace) -> str | None:
    """Check the --server options; the token to send (None: none)."""
    if not args.server:
        for given, name in ((args.server_dataset, "--server-dataset"),
                            (args.token_file, "--token-file"), (args.root_cert, "--root-cert")):
            if given is not None:
                raise ValueError(f"{name} needs --server")
        return None
    if not args.server_dataset:
        raise ValueError("--server needs --server-dataset NAME (the dataset to read there, "
                         "as the server's --dataset NAME=PATH names it)")
    if args.root_cert is not None and not os.access(args.root_cert, os.R_OK):
        raise ValueError(f"--root-cert: cannot read {args.root_cert}")
    if args.token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    from augsvc.server.tokens import token_lines  # the server's own reading of the file

    return token_lines(args.token_file)[-1]
