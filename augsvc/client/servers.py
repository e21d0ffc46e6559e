"""Server addresses, their failure counts, how to connect to them, and the loader's connections."""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc

from augsvc import wire
from augsvc.client.errors import FATAL_CODES, AugsvcError, status
from augsvc.wire._proto import augment_pb2 as pb

__all__ = ["BACKOFF_MAX_S", "DEFAULT_PORT", "ChannelCache", "Server", "ServerPool", "pem_bytes",
           "with_port"]

log = logging.getLogger("augsvc.client")

BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
DEFAULT_PORT = 50051  # `augsvc serve --port`'s default


def with_port(address: str) -> str:
    """`address` with augsvc's port when it names none ("aug-0" -> "aug-0:50051", "::1" ->
    "[::1]:50051"); gRPC would take 443. Target URIs ("dns:///aug:50051", "unix:...")
    are left as they are."""
    if address.startswith("[") and address.endswith("]"):  # [IPv6] without a port
        return f"{address}:{DEFAULT_PORT}"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is not None:
        return f"[{ip}]:{DEFAULT_PORT}" if ip.version == 6 else f"{ip}:{DEFAULT_PORT}"
    if ":" not in address:
        return f"{address}:{DEFAULT_PORT}"
    return address  # host:port, [v6]:port, or a URI with a scheme


class Server:
    """One server address: its failures in a row, and whether it is given up."""

    def __init__(self, target: str, max_retries: int) -> None:
        self.target, self.max_retries = target, max_retries
        self.failures = 0
        self.dead = False
        self.last_error: str = ""
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0

    def failed(self, reason: str) -> float | None:
        """Count a failure; the back-off before the next try, or None once dead."""
        with self._lock:
            self.failures += 1
            self.last_error = reason
            if self.failures > self.max_retries:
                if not self.dead:
                    log.error("augsvc server %s given up after %d failures in a row: %s",
                              self.target, self.failures, reason)
                self.dead = True
                return None
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self.failures - 1))
        return delay * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class ServerPool:
    """Addresses and how to connect to them (picklable; channels are made per use)."""

    targets: tuple[str, ...]
    root_certificates: bytes | None = None
    token: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    client_certificate: tuple[bytes, bytes] | None = None  # (chain, key) for mutual TLS

    def channel(self, target: str) -> grpc.Channel:
        """A channel on its own connection (distinct args, no shared subchannel pool)."""
        options = wire.channel_options(own_connection=True)
        if self.root_certificates is not None:
            chain, key = self.client_certificate or (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                                 private_key=key, certificate_chain=chain)
            return grpc.secure_channel(target, creds, options=options)
        return grpc.insecure_channel(target, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def get_dataset(self, name: str, stats: str) -> pb.DatasetInfo:
        """GetDataset from the first server that answers (each tried with retries)."""
        errors = []
        for target in self.targets:
            server = Server(target, self.max_retries)
            with self.channel(target) as channel:
                stub = wire.AugmentStub(channel)
                while True:
                    try:
                        return stub.GetDataset(
                            pb.GetDatasetRequest(name=name, stats=stats),
                            timeout=self.timeout, metadata=self.metadata,
                        )
                    except grpc.RpcError as err:
                        code, details = status(err)
                        if code in FATAL_CODES:
                            raise AugsvcError.from_rpc(err, target, "GetDataset") from None
                        delay = server.failed(f"{code.name if code else 'UNKNOWN'}: {details}")
                        if delay is None:
                            errors.append((target, code, server.last_error))
                            break
                        time.sleep(delay)
        summary = "; ".join(f"{t}: {why}" for t, _, why in errors)
        raise AugsvcError(
            f"no augsvc server answered GetDataset({name!r}) after {self.max_retries + 1} "
            f"tries each: {summary}",
            code=errors[-1][1],
        )


class ChannelCache:
    """The loader's connections, kept across passes (epochs): one per (server, stream slot).

    Reconnecting (TCP + HTTP/2, and TLS) every epoch would cost each pass a round of
    handshakes; a gRPC channel reconnects by itself after a failure.
    """

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.pid = os.getpid()  # a forked child (DataLoader worker) must make its own
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, target: str, slot: int) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get((target, slot))
            if channel is None:
                channel = self._channels[target, slot] = self.pool.channel(target)
            return channel

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def pem_bytes(root_certificates: bytes | str | Any | None) -> bytes | None:
    """PEM bytes from bytes, PEM text or a path."""
    if root_certificates is None or isinstance(root_certificates, bytes):
        return root_certificates
    if isinstance(root_certificates, str) and root_certificates.lstrip().startswith("-----BEGIN"):
        return root_certificates.encode()
    with open(root_certificates, "rb") as fh:
        return fh.read()
