"""`augsvc health HOST:PORT`: ask a server's grpc.health.v1 service whether it is SERVING."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

# exit codes
SERVING, NOT_SERVING, BAD_ARGUMENTS, NO_ANSWER = 0, 1, 2, 3


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `health` parser."""
    p = sub.add_parser(
        "health",
        help="check a server's health service (for probes and scripts)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Call grpc.health.v1.Health/Check on a server and report its status: "
        "for container HEALTHCHECKs, probes and scripts. No token is needed (augsvc serve "
        "leaves the health service open).\n\n"
        "Exit codes: 0 SERVING; 1 the server answered with another status (NOT_SERVING "
        "while it drains, or the service is unknown); 2 bad arguments; 3 no answer "
        "(nothing listens, TLS failed, or --timeout passed).",
    )
    p.add_argument("target", metavar="HOST:PORT",
                   help="the server, e.g. 127.0.0.1:50051, aug-0.augsvc:50051 or [::1]:50051")
    p.add_argument("--service", default="", metavar="NAME",
                   help="the service to ask about: '' is the whole server, augsvc.v1.Augment "
                   "the augmentation service (default: '')")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="give up after this long (default: 5)")
    tls = p.add_argument_group("TLS (the server's --tls-cert; not for --health-port)")
    tls.add_argument("--tls", action="store_true",
                     help="connect with TLS, trusting the system's root certificates")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM",
                     help="connect with TLS, trusting this CA (implies --tls)")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="client certificate for mutual TLS (needs --tls-key)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="the name the server's certificate must carry, when it differs "
                     "from HOST (e.g. checking 127.0.0.1 with a certificate for aug-0)")
    p.set_defaults(run=run)


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {target!r}")


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    import grpc

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("mutual TLS needs both --tls-cert and --tls-key")
    if not (args.tls or args.tls_ca or args.tls_cert):
        if args.tls_server_name:
            raise ValueError("--tls-server-name needs --tls or --tls-ca")
        return None

    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc

    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key),
                                        read(args.tls_cert))


def run(args: argparse.Namespace) -> int:
    """Check once; print the status; the exit code."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        _check_target(args.target)
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be > 0, got {args.timeout}")
        credentials = _credentials(args)
    except ValueError as exc:
        print(f"augsvc health: {exc}", file=sys.stderr)
        return BAD_ARGUMENTS
    what = f"{args.target} service {args.service!r}" if args.service else args.target
    if credentials is None:
        channel = grpc.insecure_channel(args.target)
    else:
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] \
            if args.tls_server_name else []
        channel = grpc.secure_channel(args.target, credentials, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                print(f"augsvc health: {what}: the server does not know this service",
                      file=sys.stderr)
                return NOT_SERVING
            print(f"augsvc health: {what}: no answer: {code.name}: {exc.details()}",
                  file=sys.stderr)
            return NO_ANSWER
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        print(f"{what}: {status}")
        return SERVING
    print(f"augsvc health: {what}: {status}", file=sys.stderr)
    return NOT_SERVING
