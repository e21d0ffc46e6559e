"""`augsvc serve`: run the gRPC augmentation server (see `augsvc.server`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TOKEN_ENV = "AUGSVC_TOKEN"
LOG_LEVELS = ("debug", "info", "warning", "error")
STATS_OPTION = ",stats="
LOG_FORMATS = ("text", "json")  # augsvc.server.logs.FORMATS, without importing grpc here


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` parser."""
    p = sub.add_parser(
        "serve",
        help="serve datasets to trainers over gRPC",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        fromfile_prefix_chars="@",
        description="Serve named datasets over gRPC (service augsvc.v1.Augment, plus the "
        "standard health service and server reflection). Trainers stream augmented batches "
        "with StreamBatches; every random choice is a function of (seed, epoch, sample), so "
        "any server returns the same batch.\n\n"
        "Worker processes share one port (SO_REUSEPORT); each has its own DALI pipelines. "
        "On start one line goes to stdout:\n"
        "  augsvc: serving <n> dataset(s) on <host>:<port> (device=<d>, workers=<w>)\n"
        "(with --health-port and --metrics-port: `..., workers=<w>, health_port=<p>, "
        "metrics_port=<q>)`, each part only with its option).\n"
        "SIGINT (Ctrl-C) or SIGTERM stops gracefully: health turns NOT_SERVING, new streams "
        "are refused with UNAVAILABLE, running streams get --grace seconds to finish; a "
        "second signal cancels them. Exit code 0 after a clean stop.\n\n"
        "@FILE stands for the arguments in FILE, one per line (e.g. --dataset=NAME=PATH), "
        "such as a mounted Kubernetes ConfigMap listing the datasets.",
    )
    p.add_argument("--dataset", "-d", metavar="NAME=PATH[,stats=FILE]", action="append",
                   required=True,
                   help="a dataset to serve under NAME: an image folder (PATH/<class>/<image>) "
                   "or a CSV manifest; indexed once at start (cached beside it). Its own "
                   "statistics (fancy PCA, normalize; spec stats 'auto' or 'dataset') are read "
                   "from FILE, or else from what `augsvc stats PATH` wrote beside it, when "
                   "present; without them 'auto' uses the ImageNet preset. Repeatable; a bare "
                   "PATH is served under its folder name. Only regular files inside PATH are "
                   "served: links (to files or folders) and manifest rows that resolve outside "
                   "it are rejected (see --allow-outside-root), directory links are followed "
                   "once (no loops)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="serve links and manifest rows that resolve outside their dataset's "
                   "folder (e.g. class folders linked from elsewhere); off by default")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                     help="address to listen on; 0.0.0.0 or :: for every interface "
                     "(default: 127.0.0.1, this machine only)")
    net.add_argument("--port", type=int, default=50051, metavar="N",
                     help="TCP port; 0 picks a free one, printed on the serving line "
                     "(default: 50051)")
    net.add_argument("--max-connection-age", type=float, default=300.0, metavar="SECONDS",
                     help="ask each client to reconnect (HTTP/2 GOAWAY) after a connection has "
                     "lived this long, so that trainers behind one address spread onto "
                     "replicas added since; running calls are not cut (see the grace); "
                     "0: never (default: 300)")
    net.add_argument("--max-connection-age-grace", type=float, default=60.0, metavar="SECONDS",
                     help="how long calls running on such a connection may still take before "
                     "it is closed; a loader fetches what was cut off elsewhere (default: 60)")
    net.add_argument("--health-port", type=int, default=None, metavar="N",
                     help="also serve grpc.health.v1 alone on this port (same --host), in "
                     "plaintext and without a token, for probes that speak neither TLS nor "
                     "tokens (Kubernetes' gRPC probes with --tls-cert on). It reports what the "
                     "main port reports, NOT_SERVING while draining included; 0 picks a free "
                     "one, printed on the serving line (default: none)")
    net.add_argument("--metrics-port", type=int, default=None, metavar="N",
                     help="serve Prometheus metrics at http://HOST:N/metrics (same --host; "
                     "plain HTTP, no token): images, bytes and batches sent, refusals, "
                     "latency, memory, worker restarts, GPU memory; the sums over every "
                     "worker. 0 picks a free port, printed on the serving line (default: "
                     "none)")
    work = p.add_argument_group("processing")
    work.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                      help="where DALI runs: gpu (nvJPEG decode + CUDA kernels), cpu, or auto: "
                      "gpu when an NVIDIA GPU is visible (default: auto)")
    work.add_argument("--device-id", type=int, default=0, metavar="N",
                      help="CUDA device for --device gpu (default: 0)")
    work.add_argument("--workers", type=int, default=1, metavar="N",
                      help="server processes sharing the port; one Python process carries "
                      "about one stream's worth of bandwidth, so use several for many "
                      "trainers (default: 1)")
    work.add_argument("--dali-threads", type=int, default=None, metavar="N",
                      help="DALI CPU threads per pipeline (default: CPU cores / workers, at "
                      "most 8)")
    work.add_argument("--io-threads", type=int, default=4, metavar="N",
                      help="file-reading threads per pipeline (default: 4)")
    work.add_argument("--gpus", metavar="LIST",
                      help="run --workers workers on each of these GPUs, all on one port: "
                      "indices like 0,1 (of the GPUs CUDA_VISIBLE_DEVICES shows, if set) or "
                      "'all'; each worker sees only its GPU (default: --device-id only)")
    work.add_argument("--prefetch", type=int, default=2, metavar="N",
                      help="finished batches a stream has made ahead of the one being sent; "
                      "bounds each stream's memory (default: 2)")
    work.add_argument("--pipeline-cache", type=int, default=4, metavar="N",
                      help="pipelines without streams each worker keeps for later streams "
                      "with the same dataset, spec and batch size; streams that share those "
                      "share one pipeline (default: 4)")
    work.add_argument("--batch-cache-mb", type=int, default=0, metavar="MB",
                      help="memory per worker for finished batches, sent again from memory "
                      "when the same batch is asked for again (failover re-requests, jobs "
                      "sharing a seed, `augsvc bench`); 0 turns it off (default: 0)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-streams", type=int, default=64, metavar="N",
                        help="concurrent StreamBatches calls per worker; more are refused "
                        "with RESOURCE_EXHAUSTED and trailing metadata augsvc-retry: busy, "
                        "which AugmentLoader retries (default: 64)")
    limits.add_argument("--max-batch-size", type=int, default=1024, metavar="N",
                        help="largest batch_size a request may ask for; larger ones are "
                        "refused with RESOURCE_EXHAUSTED (default: 1024)")
    limits.add_argument("--max-memory", default="auto", metavar="SIZE",
                        help="memory per worker for batches being made or not yet sent, all "
                        "streams together (e.g. 512M, 4G; a bare number is MiB); streams "
                        "wait when it is full. auto: a quarter of the memory available "
                        "(MemAvailable, or what a cgroup limit leaves) divided among the "
                        "workers, at least 256M (default: auto)")
    limits.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="cancel a stream whose client reads nothing for this long, with "
                        "DEADLINE_EXCEEDED (clients retry), freeing its memory; 0: never "
                        "(default: 60)")
    limits.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="seconds running streams get to finish on shutdown (default: 10)")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="serve TLS with this certificate chain (needs --tls-key)")
    sec.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    sec.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                     help="mutual TLS: require client certificates signed by this CA")
    sec.add_argument("--token-file", type=Path, metavar="FILE",
                     help="require metadata 'authorization: Bearer <token>' on augsvc.v1.Augment "
                     "calls, the token being one of this file's lines (health and reflection "
                     "stay open). The file is read again when it changes (checked at most "
                     "once a second), so rotate without a restart: write the old and the new "
                     "token, move the trainers, then write the new one alone. Preferred, like "
                     f"${TOKEN_ENV}, which is used when neither this nor --token is given")
    sec.add_argument("--token", metavar="TOKEN",
                     help="the bearer token itself; visible to every local user in the process "
                     f"list, so prefer --token-file or ${TOKEN_ENV}")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                   help="logging on stderr: info has one line per start, stop and refused "
                   "stream (rate-limited); debug adds one per stream (default: info). gRPC "
                   "core's own lines are off unless the GRPC_VERBOSITY environment variable "
                   "asks for them")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                   help="text lines, or json: one object per line (time, level, logger, pid, "
                   "message and the line's fields) for a log collector (default: text)")
    p.set_defaults(run=run)


def _datasets(items: list[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """(datasets, statistics files) of NAME=PATH[,stats=FILE] items (a bare PATH is named
    after its folder or file stem)."""
    out: dict[str, Path] = {}
    stats: dict[str, Path] = {}
    for item in items:
        spec, sep, stats_path = item.rpartition(STATS_OPTION)
        if not sep:
            spec, stats_path = item, ""
        elif not stats_path:
            raise ValueError(f"--dataset {item!r}: expected NAME=PATH,stats=FILE")
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ValueError(f"--dataset {item!r}: expected NAME=PATH[,stats=FILE]")
        if name in out:
            raise ValueError(f"--dataset {item!r}: the name {name!r} is given twice")
        out[name] = Path(path)
        if stats_path:
            stats[name] = Path(stats_path)
    return out, stats


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _memory_size(text: str) -> int | None:
    """--max-memory: None for auto, else bytes ("512M", "4G", or MiB without a unit)."""
    size = text.strip().upper().removesuffix("B").removesuffix("I")
    if size == "AUTO":
        return None
    unit = _SIZE_UNITS.get(size[-1:])
    number = size[:-1] if unit else size
    try:
        value = float(number) * (unit or _SIZE_UNITS["M"])
    except ValueError:
        raise ValueError(f"--max-memory {text!r}: expected auto or a size like 512M or 4G") \
            from None
    if not 1 <= value < float(1 << 62):
        raise ValueError(f"--max-memory {text!r}: must be at least one byte")
    return int(value)


def _token(args: argparse.Namespace) -> str | None:
    """The fixed token: --token, else $AUGSVC_TOKEN unless --token-file is given."""
    if args.token_file is not None and args.token is not None:
        raise ValueError("give either --token-file or --token, not both")
    if args.token is not None:
        return args.token
    if args.token_file is not None:
        return None
    return os.environ.get(TOKEN_ENV) or None


def _check_readable(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")


def run(args: argparse.Namespace) -> int:
    """Configure, index the datasets, serve until stopped."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # read once, when grpc is imported
    from augsvc.core.stats import StatsError
    from augsvc.engine.dataset import DatasetError
    from augsvc.server import ServerConfig, serve
    from augsvc.server.gpus import parse_gpus
    from augsvc.server.logs import configure

    configure(args.log_level, args.log_format)

    try:
        _check_readable(args.tls_cert, args.tls_key, args.tls_client_ca)
        datasets, stats_files = _datasets(args.dataset)
        config = ServerConfig(
            datasets=datasets,
            stats_files=stats_files,
            host=args.host,
            port=args.port,
            health_port=args.health_port,
            device=args.device,
            device_id=args.device_id,
            workers=args.workers,
            max_streams=args.max_streams,
            max_batch_size=args.max_batch_size,
            prefetch=args.prefetch,
            pipeline_cache=args.pipeline_cache,
            dali_threads=args.dali_threads,
            io_threads=args.io_threads,
            batch_cache_mb=args.batch_cache_mb,
            grace=args.grace,
            stall_timeout=args.stall_timeout,
            max_memory=_memory_size(args.max_memory),
            metrics_port=args.metrics_port,
            gpus=parse_gpus(args.gpus) if args.gpus is not None else (),
            max_connection_age=args.max_connection_age,
            max_connection_age_grace=args.max_connection_age_grace,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token=_token(args),
            token_file=args.token_file,
            allow_outside_root=args.allow_outside_root,
        ).validate()
        return serve(config)
    except (ValueError, DatasetError, StatsError, OSError) as exc:
        print(f"augsvc serve: {exc}", file=sys.stderr)
        return 2
