"""Server names to addresses: parsing `host:port` / `dns:///host:port`, resolving every replica.

A target names one server or a set of replicas behind one DNS name (a Kubernetes
headless Service answers with one address per ready pod). `parse_target` reads it
(a missing port means 50051) and `canonical_target` writes it as the loader keeps it;
a `unix:` socket path is passed to gRPC as it is. `resolve_addresses` asks the system resolver
(`socket.getaddrinfo`) for every address of the name; `Endpoint` is one of them,
still carrying the name (TLS checks the certificate against it, and it is the
`:authority`). `Discovery` turns the loader's targets into the current endpoint set
and says when to look again. See docs/discovery.md.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PORT",
    "Discovery",
    "Endpoint",
    "Resolve",
    "canonical_target",
    "format_address",
    "parse_target",
    "resolve_addresses",
]

DEFAULT_PORT = 50051  # augsvc serve's default port

# resolve(host, port) -> the addresses (IP literals) of host; an empty list or OSError: none
Resolve = Callable[[str, int], Sequence[str]]


def parse_target(target: str) -> tuple[str, int]:
    """(host, port) of "host", "host:port", "[v6]:port", "v6", or "dns:///host:port".

    A missing port means DEFAULT_PORT. ValueError for anything else (another URI
    scheme, a "dns://server/" authority, an empty host, a port outside 1..65535).
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"a server address must be 'host:port', got {target!r}")
    rest = target.strip()
    if rest.startswith("dns:"):
        rest = rest[len("dns:"):]
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
            if authority:
                raise ValueError(f"{target!r}: a DNS server in the target (dns://{authority}/) "
                                 "is not supported; augsvc uses the system resolver "
                                 "(write dns:///host:port)")
    elif "://" in rest or rest.split(":", 1)[0] in ("unix", "ipv4", "ipv6", "xds"):
        raise ValueError(f"{target!r}: only host:port and dns:///host:port targets are supported")
    if rest.startswith("["):  # [v6] or [v6]:port
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{target!r}: expected [ipv6-address]:port")
        has_port, port_text = bool(tail), tail[1:]
    elif rest.count(":") > 1:  # a bare IPv6 literal, no port
        host, has_port, port_text = rest, False, ""
    else:
        host, colon, port_text = rest.partition(":")
        has_port = bool(colon)
    if not host:
        raise ValueError(f"{target!r}: no host name")
    if not has_port:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{target!r}: the port must be a number in 1..65535")
    return host, int(port_text)


def canonical_target(target: str) -> str:
    """`target` as the loader keeps it: "host:port" (the port added when missing: gRPC
    would take 443), "dns:///host:port", or a "unix:" socket as given. ValueError as
    `parse_target`."""
    text = target.strip() if isinstance(target, str) else target
    if isinstance(text, str) and text.startswith("unix:") and len(text) > len("unix:"):
        return text
    host, port = parse_target(text)
    address = format_address(host, port)
    return f"dns:///{address}" if text.startswith("dns:") else address


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address of `host` from the system resolver, one family: IPv4 when it has any.

    One family, so that a dual-stack name (or "localhost": 127.0.0.1 and ::1) counts
    each server once rather than twice. OSError (socket.gaierror) when it has none.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


def format_address(host: str, port: int) -> str:
    """host:port, IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One server address (`address`, an IP literal and port) found through `name`."""

    address: str  # "10.0.0.7:50051": what the channel connects to
    name: str  # "augsvc-headless.ns.svc:50051": the target it came from (TLS, :authority)

    @property
    def host_name(self) -> str | None:
        """The DNS name the certificate must match, None when the target was an address."""
        if self.name.startswith("unix:"):
            return None
        host, _ = parse_target(self.name)
        return None if _is_ip(host) else host


class Discovery:
    """The endpoints of a loader's targets, resolved again every `interval` s or on request.

    `resolve()` returns the current set: every address of every target, in target
    order, without duplicates. A target that does not resolve now keeps the addresses
    it had (its replicas may only be restarting); `errors` says why. IP literals are
    not looked up.
    """

    def __init__(self, targets: Sequence[str], resolve: Resolve, interval: float) -> None:
        self.sockets = tuple(t for t in targets if t.startswith("unix:"))
        self.targets = tuple(parse_target(t) for t in targets if not t.startswith("unix:"))
        self.names = tuple(format_address(h, p) for h, p in self.targets)
        self._resolve, self.interval = resolve, interval
        self._last: dict[int, list[Endpoint]] = {}
        self.errors: dict[str, str] = {}
        self.resolved_at = -float("inf")
        self._wanted = True

    @property
    def dynamic(self) -> bool:
        """Whether any target is a name (worth resolving again), not an address."""
        return any(not _is_ip(host) for host, _ in self.targets)

    def request(self) -> None:
        """Ask for a resolution at the next `due()` check (after a failure)."""
        self._wanted = True

    def due(self, now: float, min_gap: float) -> bool:
        """Whether to resolve now: the interval passed, or requested and `min_gap` s passed."""
        since = now - self.resolved_at
        return since >= self.interval or (self._wanted and since >= min_gap)

    def resolve(self) -> list[Endpoint]:
        self._wanted = False
        self.resolved_at = time.monotonic()
        out = [Endpoint(path, path) for path in self.sockets]
        for i, ((host, port), name) in enumerate(zip(self.targets, self.names, strict=True)):
            if _is_ip(host):
                found = [Endpoint(name, name)]
            else:
                try:
                    addresses = list(self._resolve(host, port))
                except OSError as exc:
                    addresses = []
                    self.errors[name] = f"cannot resolve {host!r}: {exc}"
                else:
                    if addresses:
                        self.errors.pop(name, None)
                    else:
                        self.errors[name] = f"{host!r} resolved to no address"
                found = (list(dict.fromkeys(Endpoint(format_address(a, port), name)
                                            for a in addresses))
                         or self._last.get(i, []))
            self._last[i] = found
            out += [e for e in found if e not in out]
        return out
