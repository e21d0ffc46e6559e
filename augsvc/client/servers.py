"""How the loader connects: `ServerPool` (settings, channels, GetDataset), `Server` (one
address's health), `ChannelCache` (connections kept across passes), back-off.

No server is ever given up for a number of failures: a server that fails is retried
with capped exponential back-off and jitter, and the loader as a whole gives up only
when no server has answered for `reconnect_timeout` seconds.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from augsvc import wire
from augsvc.client.discovery import (
    Discovery,
    Endpoint,
    Resolve,
    canonical_target,
    parse_target,
    resolve_addresses,
)
from augsvc.client.errors import FATAL_CODES, AugsvcError, status
from augsvc.client.placement import Placement
from augsvc.client.tlsprobe import looks_like_setup_failure, tls_mismatch
from augsvc.wire._proto import augment_pb2 as pb

__all__ = [
    "BACKOFF_MAX_S",
    "ChannelCache",
    "Server",
    "ServerPool",
    "backoff_delay",
    "pem_bytes",
]

log = logging.getLogger("augsvc.client")

BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
# gRPC's own reconnection back-off (defaults: 1 s growing to 120 s) would keep a channel
# from noticing a restarted server for minutes; ours is short and capped.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", int(BACKOFF_BASE_S * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(BACKOFF_BASE_S * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX_S * 1000)),
]


def backoff_delay(failures: int) -> float:
    """Seconds to wait after `failures` (>= 1) failures in a row: 0.1 s doubling up to 2 s,
    each drawn from [50 %, 100 %] of that (jitter, so that clients do not retry in step)."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(failures - 1, 16)) * random.uniform(0.5, 1)


class Server:
    """One address's health, shared by its streams: since when it fails and why; and
    which of its workers the streams landed on (`placement`).

    Not a counter that kills it: a failing server keeps being retried (each stream
    backs off on its own); `failing_since` feeds the loader's `reconnect_timeout`.
    """

    def __init__(self, endpoint: Endpoint, slots: int) -> None:
        self.endpoint = endpoint
        self.target = endpoint.address
        self.failing_since: float | None = None
        self.last_error = ""
        self.busy = False  # its last failure was a "busy" refusal (over its --max-streams)
        self.placement = Placement(slots)  # of its `slots` streams
        self._lock = threading.Lock()

    def failed(self, reason: str, *, busy: bool = False) -> bool:
        """Record a failure (`busy`: the server refused the call as full); True if the
        server was answering until now."""
        with self._lock:
            self.last_error, self.busy = reason, busy
            if self.failing_since is not None:
                return False
            self.failing_since = time.monotonic()
            return True

    def answered(self) -> float | None:
        """Record an answer; how long it had been failing (None: it was not)."""
        with self._lock:
            since, self.failing_since = self.failing_since, None
        return None if since is None else time.monotonic() - since


@dataclass(frozen=True)
class ServerPool:
    """Where the servers are and how to connect to them (picklable; channels made per use).

    `targets` are names or addresses (`augsvc.client.discovery.canonical_target`), each
    resolved to every address it has by `resolve` (default: the system resolver), again
    every `resolve_interval` s.
    """

    targets: tuple[str, ...]
    root_certificates: bytes | None = None
    token: str | None = None
    timeout: float = 60.0
    reconnect_timeout: float = 300.0
    client_certificate: tuple[bytes, bytes] | None = None  # (chain, key) for mutual TLS
    resolve: Resolve = resolve_addresses
    resolve_interval: float = 30.0

    def __post_init__(self) -> None:
        """ValueError / TypeError naming what is wrong with a target or a setting."""
        for target in self.targets:
            canonical_target(target)
        for name in ("reconnect_timeout", "resolve_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float))
                                               and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not callable(self.resolve):
            raise TypeError(f"resolve must be a function (host, port) -> addresses, "
                            f"got {self.resolve!r}")

    def discovery(self) -> Discovery:
        return Discovery(self.targets, self.resolve, self.resolve_interval)

    def channel(self, endpoint: Endpoint) -> grpc.Channel:
        """A channel to one address on its own connection (distinct args, no shared
        subchannel pool); TLS checks the certificate against the name it came from."""
        options = [*wire.channel_options(own_connection=True), *_RECONNECT_OPTIONS]
        if endpoint.host_name is not None:
            options.append(("grpc.default_authority", endpoint.name))
        if self.root_certificates is not None:
            if endpoint.host_name is not None:
                options.append(("grpc.ssl_target_name_override", endpoint.host_name))
            chain, key = self.client_certificate or (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                                 private_key=key, certificate_chain=chain)
            return grpc.secure_channel(endpoint.address, creds, options=options)
        return grpc.insecure_channel(endpoint.address, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def setup_error(self, endpoint: Endpoint, err: grpc.RpcError, what: str) -> AugsvcError | None:
        """An AugsvcError naming a TLS mismatch, when a failed connection setup was one."""
        code, details = status(err)
        if code is not grpc.StatusCode.UNAVAILABLE or not looks_like_setup_failure(details):
            return None
        if endpoint.address.startswith("unix:"):
            return None
        host, port = parse_target(endpoint.address)
        why = tls_mismatch(host, port, tls=self.root_certificates is not None,
                           client_certificate=self.client_certificate,
                           timeout=min(self.timeout, 10.0))
        if why is None:
            return None
        return AugsvcError(f"{what} on {endpoint.address} failed: {why} (gRPC said: {details})",
                           code=code, details=details, server=endpoint.address)

    def get_dataset(self, name: str, stats: str) -> pb.DatasetInfo:
        """GetDataset from the first server that answers, every address tried in turn,
        with back-off, for up to `reconnect_timeout` s."""
        request = pb.GetDatasetRequest(name=name, stats=stats)
        discovery = self.discovery()
        start = time.monotonic()
        errors: dict[str, tuple[grpc.StatusCode | None, str]] = {}
        failures, warned = 0, False
        while True:
            for endpoint in discovery.resolve():
                try:
                    return self._get_dataset(endpoint, request)
                except grpc.RpcError as err:
                    code, details = status(err)
                    if code in FATAL_CODES:
                        raise AugsvcError.from_rpc(err, endpoint.address, "GetDataset") from None
                    mismatch = self.setup_error(endpoint, err, "GetDataset")
                    if mismatch is not None:
                        raise mismatch from None
                    errors[endpoint.address] = (code, f"{code.name if code else 'UNKNOWN'}: "
                                                      f"{details}")
            summary = "; ".join([f"{a}: {why}" for a, (_, why) in errors.items()]
                                + list(discovery.errors.values()))
            waited = time.monotonic() - start
            if waited >= self.reconnect_timeout:
                last = next(reversed(errors.values()), (grpc.StatusCode.UNAVAILABLE, ""))
                raise AugsvcError(f"no augsvc server answered GetDataset({name!r}) within "
                                  f"{self.reconnect_timeout:g} s: {summary}", code=last[0])
            if not warned:
                warned = True
                log.warning("no augsvc server answers GetDataset (%s); waiting up to %g s "
                            "for one", summary, self.reconnect_timeout)
            failures += 1
            time.sleep(min(backoff_delay(failures), self.reconnect_timeout - waited))

    def _get_dataset(self, endpoint: Endpoint, request: pb.GetDatasetRequest) -> pb.DatasetInfo:
        with self.channel(endpoint) as channel:
            return wire.AugmentStub(channel).GetDataset(request, timeout=self.timeout,
                                                        metadata=self.metadata)


class ChannelCache:
    """The loader's connections, kept across passes (epochs): one per (address, stream slot).

    Reconnecting (TCP + HTTP/2, and TLS) every epoch would cost each pass a round of
    handshakes; a gRPC channel reconnects by itself after a failure. `replace` swaps a
    slot's channel for a fresh one and closes the old one in the background (closing
    it is what frees a call gRPC left hanging).
    """

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.pid = os.getpid()  # a forked child (DataLoader worker) must make its own
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, endpoint: Endpoint, slot: int) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get((endpoint.address, slot))
            if channel is None:
                channel = self._channels[endpoint.address, slot] = self.pool.channel(endpoint)
            return channel

    def replace(self, endpoint: Endpoint, slot: int, old: grpc.Channel) -> None:
        """Drop `old` from the slot (if it is still there) and close it in the background."""
        with self._lock:
            if self._channels.get((endpoint.address, slot)) is old:
                del self._channels[endpoint.address, slot]
        _close_later(old)

    def drop(self, address: str) -> None:
        """Close every channel to `address` (a replica that left)."""
        with self._lock:
            keys = [k for k in self._channels if k[0] == address]
            channels = [self._channels.pop(k) for k in keys]
        for channel in channels:
            _close_later(channel)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def _close_later(channel: grpc.Channel) -> None:
    """Close a channel on a daemon thread: nothing waits for it."""
    closer: Callable[[], None] = channel.close
    threading.Thread(target=closer, name="augsvc-channel-close", daemon=True).start()


def pem_bytes(root_certificates: bytes | str | Any | None) -> bytes | None:
    """PEM bytes from bytes, PEM text or a path."""
    if root_certificates is None or isinstance(root_certificates, bytes):
        return root_certificates
    if isinstance(root_certificates, str) and root_certificates.lstrip().startswith("-----BEGIN"):
        return root_certificates.encode()
    with open(root_certificates, "rb") as fh:
        return fh.read()
