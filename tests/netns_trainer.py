"""A stand-in trainer for the netns tests: one epoch through `AugmentLoader`, a JSON line per batch.

    python tests/netns_trainer.py --out FILE --dataset NAME --spec JSON --batch-size N \\
        --seed S --epoch E [--step-s SECONDS] [--loader JSON] -- TARGET [TARGET ...]

TARGETs go to `AugmentLoader` as given (host:port addresses, or any target the loader
accepts). Each batch is appended to FILE as `epochs.batch_record` (flushed, so a test can
follow the progress), then the script sleeps `--step-s` (a training step). The last line is
`{"done": true, "batches": n, "seconds": s, "stats": loader.stats().as_dict()}`, or
`{"error": "..."}` (exit status 1) when the loader raised. Loader log lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from epochs import batch_record

from augsvc.client import AugmentLoader, AugsvcError
from augsvc.core.spec import AugmentSpec


def main(argv: list[str] | None = None) -> int:
    """Run one epoch and write its records; the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="file to append the JSON lines to")
    p.add_argument("--dataset", required=True)
    p.add_argument("--spec", required=True, help="AugmentSpec as JSON")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--step-s", type=float, default=0.0, help="sleep after every batch")
    p.add_argument("--loader", default="{}", help="more AugmentLoader keyword arguments, JSON")
    p.add_argument("targets", nargs="+")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = AugmentSpec.from_json(args.spec)
    started = time.monotonic()
    with open(args.out, "a", encoding="utf-8") as out:
        def write(line: dict) -> None:
            out.write(json.dumps(line) + "\n")
            out.flush()

        try:
            with AugmentLoader(args.targets, args.dataset, spec, args.batch_size, args.seed,
                               epoch=args.epoch, return_meta=True,
                               **json.loads(args.loader)) as loader:
                count = 0
                for images, labels, meta in loader:
                    write(batch_record(args.epoch, meta.index, meta.sample_ids, labels, images))
                    count += 1
                    time.sleep(args.step_s)
                stats = loader.stats().as_dict()
        except AugsvcError as exc:
            write({"error": str(exc)})
            return 1
        write({"done": True, "batches": count, "seconds": time.monotonic() - started,
               "stats": stats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
