"""Hosts for tests as Linux network namespaces: a trainer and server hosts on one bridge.

    why = unavailable("ip", "nft", "tc")          # None, or what is missing (for pytest.skip)
    with Network(servers=3) as net, Cluster(net, {"photos": folder}) as cluster:
        run = Trainer.start(net, cluster.addresses, "photos", spec, batch_size=4, ...)
        run.wait_for(10)                          # batches delivered so far
        net.partition(net.servers[1]); time.sleep(8); net.heal(net.servers[1])
        records = run.finish()                    # every batch as epochs.batch_record

Layout. Each host is a namespace `augns-<pid>-<n>-<host>` holding one veth, `eth0`, whose
peer is a port of a bridge in a namespace of its own (`augns-<pid>-<n>-bridge`). Nothing
is added to the root namespace (no interface, address, route or firewall rule): the
machine's own firewall and bridge netfilter never see the test traffic, no route to
198.18/15 can leak onto a real network, and deleting the namespaces removes every veth
with them. Addresses come from 198.18.0.0/15, the benchmarking range: the trainer is
198.18.0.1, server hosts 198.18.0.11, .12, ...; namespaces are isolated, so concurrent
runs may use the same addresses.

Names. `/etc/netns/<ns>/hosts` (which `ip netns exec` bind-mounts on /etc/hosts) names
every host, and `SERVICE_NAME` once per server host, so it resolves to all of them (as a
headless Service's name does), except hosts taken out with `list_in_service(host, False)`
(a pod that is not ready: it runs, but the name no longer lists it). The files are
rewritten in place when a host joins or leaves, so processes already running see the
change on their next lookup. Checked here:
`socket.getaddrinfo` (glibc) returns every address, but grpc's default resolver (c-ares)
takes only the first line of a hosts file for a name (one of three connections made, with
`round_robin`); `GRPC_DNS_RESOLVER=native` gives all three.

Faults, per host: `partition` (link down, or an nftables drop of everything on eth0) and
`heal`; `add_loss` (nftables `numgen random mod 1000 < N drop`, both ways, with GSO cut to
one segment so that a drop is one packet, as on a wire); `limit_rate` (tc tbf on both
directions of the host's link). This kernel has no netem: there is no added delay.

Cleanup. `Network.close()` (from `__exit__`, and at exit, so also after a failure or
Ctrl-C) kills what still runs in its namespaces and deletes them with their /etc/netns
folders; a new Network first deletes namespaces of earlier runs whose process is gone.
Every command has a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serverproc import ServerProcess, running_server

from augsvc.core.spec import AugmentSpec

__all__ = ["PORT", "SERVICE_NAME", "Cluster", "Host", "Network", "Trainer", "unavailable"]

PREFIX = "augns"
SERVICE_NAME = "augsvc-headless"  # resolves to every server host
PORT = 50051  # every server host serves on this port of its own address
SUBNET = "198.18.0"  # a /24 of 198.18.0.0/15
TRAINER_SCRIPT = Path(__file__).with_name("netns_trainer.py")
NETNS_ETC = Path("/etc/netns")
PACKAGES = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}
CMD_TIMEOUT_S = 20.0
PARTITION_TABLE = "augsvc_partition"
LOSS_TABLE = "augsvc_loss"
_networks = itertools.count()


class NetnsError(RuntimeError):
    """A namespace command failed."""


def sh(*cmd: str, input: str | None = None, timeout: float = CMD_TIMEOUT_S) -> str:
    """Run a command; its stdout. NetnsError with its stderr when it fails."""
    try:
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(cmd)}: no answer within {timeout:g} s") from None
    if out.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


@functools.cache
def unavailable(*tools: str) -> str | None:
    """Why the harness cannot run here (not root, a missing tool, namespaces or a tool's
    kernel support not permitted), or None. `tools`: any of "ip", "nft", "tc"."""
    if os.geteuid() != 0:
        return "not root (network namespaces and veth pairs need root)"
    for tool in dict.fromkeys(("ip", *tools)):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (install the {PACKAGES[tool]} package)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        sh("ip", "netns", "add", probe)
    except NetnsError as exc:
        return f"network namespaces not permitted here: {exc}"
    try:
        if "nft" in tools:
            sh("ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe")
        if "tc" in tools:
            sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
               "tbf", "rate", "1mbit", "burst", "32kb", "latency", "50ms")
    except NetnsError as exc:
        return f"not permitted in a network namespace: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            sh("ip", "netns", "del", probe)
    return None


@dataclass
class Host:
    """One host: a namespace with `eth0` at `address`; `peer` is its port on the bridge."""

    name: str
    ns: str
    address: str
    peer: str

    def argv(self, *cmd: str) -> list[str]:
        """`cmd` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def target(self, port: int = PORT) -> str:
        """host:port of this host's server."""
        return f"{self.address}:{port}"


class Network:
    """A trainer host and `servers` server hosts on one bridge (see the module doc)."""

    def __init__(self, servers: int = 2) -> None:
        clean_stale()
        self.tag = f"{PREFIX}-{os.getpid()}-{next(_networks)}"
        self.bridge_ns = f"{self.tag}-bridge"
        self.hosts: dict[str, Host] = {}
        self._unlisted: set[str] = set()  # server hosts left out of SERVICE_NAME
        self._next_server = 0
        self._closed = False
        atexit.register(self.close)
        try:
            sh("ip", "netns", "add", self.bridge_ns)
            self._in_bridge("ip", "link", "add", "br0", "type", "bridge")
            self._in_bridge("ip", "link", "set", "br0", "up")
            self.trainer = self._add_host("trainer", f"{SUBNET}.1")
            for _ in range(servers):
                self.add_server()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def servers(self) -> list[Host]:
        """The server hosts, in the order they joined."""
        return [h for name, h in self.hosts.items() if name != "trainer"]

    def add_server(self, listed: bool = True) -> Host:
        """A new server host (`server-<i>` at 198.18.0.<11 + i>); SERVICE_NAME includes it
        unless `listed` is False (then `list_in_service` adds it later)."""
        i = self._next_server
        self._next_server += 1
        name = f"server-{i}"
        if not listed:
            self._unlisted.add(name)
        return self._add_host(name, f"{SUBNET}.{11 + i}")

    def list_in_service(self, host: Host, listed: bool = True) -> None:
        """Put `host` in SERVICE_NAME, or (`listed` False) take it out while it keeps
        running, as a pod turning ready or leaving a headless Service's answer."""
        (self._unlisted.discard if listed else self._unlisted.add)(host.name)
        self._write_hosts()

    def remove_host(self, host: Host) -> None:
        """Kill what runs on `host`, delete it and drop it from every hosts file."""
        del self.hosts[host.name]
        self._unlisted.discard(host.name)
        _delete_namespace(host.ns)
        self._write_hosts()

    def _add_host(self, name: str, address: str) -> Host:
        host = Host(name, f"{self.tag}-{name}", address, f"v-{name}"[:15])
        sh("ip", "netns", "add", host.ns)
        self.hosts[name] = host
        sh("ip", "link", "add", "eth0", "netns", host.ns, "type", "veth",
           "peer", "name", host.peer, "netns", self.bridge_ns)
        self._in_bridge("ip", "link", "set", host.peer, "master", "br0")
        self._in_bridge("ip", "link", "set", host.peer, "up")
        sh("ip", "-n", host.ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", host.ns, "link", "set", "lo", "up")
        sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
        self._write_hosts()
        return host

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost"]
        lines += [f"{h.address} {h.name}" for h in self.hosts.values()]
        lines += [f"{h.address} {SERVICE_NAME}" for h in self.servers
                  if h.name not in self._unlisted]
        text = "\n".join(lines) + "\n"
        for host in self.hosts.values():
            path = NETNS_ETC / host.ns / "hosts"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)  # truncates in place: the bind mounts keep the same inode

    def _in_bridge(self, *cmd: str) -> str:
        return sh("ip", "netns", "exec", self.bridge_ns, *cmd)

    def _in(self, host: Host, *cmd: str, input: str | None = None) -> str:
        return sh(*host.argv(*cmd), input=input)

    # --- faults

    def partition(self, host: Host, how: str = "link") -> None:
        """Cut `host` off: its link down ("link"), or nftables drops all it sends and
        receives on eth0 ("nft"; the link stays up, packets vanish)."""
        if how == "link":
            sh("ip", "-n", host.ns, "link", "set", "eth0", "down")
        elif how == "nft":
            self._in(host, "nft", "-f", "-", input=(
                f"table inet {PARTITION_TABLE} {{\n"
                " chain input { type filter hook input priority -10; iifname \"eth0\" drop; }\n"
                " chain output { type filter hook output priority -10; oifname \"eth0\" drop; }\n"
                "}\n"))
        else:
            raise ValueError(f"how must be 'link' or 'nft', got {how!r}")

    def heal(self, host: Host) -> None:
        """Undo `partition` (either kind)."""
        sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
        with contextlib.suppress(NetnsError):  # no table: it was a link partition
            self._in(host, "nft", "delete", "table", "inet", PARTITION_TABLE)

    def add_loss(self, host: Host, per_mille: int = 1) -> None:
        """Drop `per_mille`/1000 of the packets `host` receives and of those it sends, at
        random (nftables numgen), one wire packet at a time: GSO is cut to one segment on
        its link, so no drop takes a 64 KB super-packet with it."""
        self._in(host, "nft", "-f", "-", input=(
            f"table inet {LOSS_TABLE} {{\n"
            f" chain input {{ type filter hook input priority -5; iifname \"eth0\" "
            f"numgen random mod 1000 < {per_mille} counter drop; }}\n"
            f" chain output {{ type filter hook output priority -5; oifname \"eth0\" "
            f"numgen random mod 1000 < {per_mille} counter drop; }}\n"
            "}\n"))
        self._set_gso_segs(host, 1)

    def dropped_packets(self, host: Host) -> int:
        """Packets `add_loss` dropped on `host` so far (both directions)."""
        ruleset = json.loads(self._in(host, "nft", "-j", "list", "table", "inet", LOSS_TABLE))
        return sum(expr["counter"]["packets"] for item in ruleset["nftables"]
                   if "rule" in item for expr in item["rule"]["expr"] if "counter" in expr)

    def remove_loss(self, host: Host) -> None:
        """Undo `add_loss`."""
        self._in(host, "nft", "delete", "table", "inet", LOSS_TABLE)
        self._set_gso_segs(host, 65535)  # the veth default

    def _set_gso_segs(self, host: Host, segments: int) -> None:
        sh("ip", "-n", host.ns, "link", "set", "eth0", "gso_max_segs", str(segments))
        sh("ip", "-n", self.bridge_ns, "link", "set", host.peer, "gso_max_segs", str(segments))

    def limit_rate(self, host: Host, bits_per_s: int) -> None:
        """A token bucket (tc tbf) of `bits_per_s` on each direction of `host`'s link."""
        burst = max(64 * 1024, bits_per_s // 8 // 250)  # >= one 4 ms tick at HZ 250
        qdisc = ["root", "tbf", "rate", f"{bits_per_s}bit", "burst", str(burst),
                 "latency", "50ms"]
        self._in(host, "tc", "qdisc", "replace", "dev", "eth0", *qdisc)
        self._in_bridge("tc", "qdisc", "replace", "dev", host.peer, *qdisc)

    def remove_rate_limit(self, host: Host) -> None:
        """Undo `limit_rate`."""
        self._in(host, "tc", "qdisc", "del", "dev", "eth0", "root")
        self._in_bridge("tc", "qdisc", "del", "dev", host.peer, "root")

    # --- cleanup

    def close(self) -> None:
        """Kill every process left in the namespaces and delete them (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for ns in [h.ns for h in self.hosts.values()] + [self.bridge_ns]:
            _delete_namespace(ns)
        self.hosts.clear()


def _delete_namespace(ns: str) -> None:
    """SIGKILL the processes in `ns`, delete it and its /etc/netns folder (no error if gone)."""
    with contextlib.suppress(NetnsError):
        for pid in sh("ip", "netns", "pids", ns).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(NetnsError):
        sh("ip", "netns", "del", ns)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def clean_stale() -> list[str]:
    """Delete the namespaces (and /etc/netns folders) of runs whose process is gone; their
    names."""
    names = {line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line}
    if NETNS_ETC.is_dir():
        names |= {p.name for p in NETNS_ETC.iterdir()}
    stale = []
    for name in sorted(names):
        match = re.fullmatch(rf"{PREFIX}-(\d+)-.+", name)
        if match and not _alive(int(match[1])):
            _delete_namespace(name)
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------
# augsvc on the hosts


SERVED = re.compile(r"stream from \S+ \w+: \S+, (\d+) of \d+ batch\(es\)")


class Cluster:
    """`augsvc serve --host 0.0.0.0 --port PORT` on every server host of `net`; hosts can be
    stopped, restarted, added ("a replica joins") and removed while a trainer runs."""

    def __init__(self, net: Network, datasets: dict[str, Path], *serve_args: str,
                 workers: int = 1) -> None:
        self.net, self.datasets, self.serve_args, self.workers = (
            net, datasets, serve_args, workers)
        self._running: dict[str, tuple[contextlib.ExitStack, ServerProcess]] = {}
        self._logs: dict[str, str] = {}
        try:
            for host in net.servers:
                self.start(host)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def addresses(self) -> list[str]:
        """host:port of every server host, running or not (what a trainer lists by hand)."""
        return [h.target() for h in self.net.servers]

    @property
    def service_target(self) -> str:
        """SERVICE_NAME:PORT: one name for every server host (for discovery)."""
        return f"{SERVICE_NAME}:{PORT}"

    def start(self, host: Host) -> ServerProcess:
        """Start the server on `host`; it returns once the server is serving."""
        stack = contextlib.ExitStack()
        server = stack.enter_context(running_server(  # debug: one line per stream (SERVED)
            self.datasets, "--host", "0.0.0.0", "--log-level", "debug", *self.serve_args,
            workers=self.workers, port=PORT, prefix=host.argv()))
        self._running[host.name] = (stack, server)
        return server

    def stop(self, host: Host, sig: int = signal.SIGTERM) -> int:
        """Stop `host`'s server (SIGTERM: a graceful drain); its exit status."""
        stack, server = self._running.pop(host.name)
        with stack:
            rc = server.stop(sig)
            self._logs[host.name] = self._logs.get(host.name, "") + server.stderr()
        return rc

    def add_replica(self) -> Host:
        """A new server host, serving, then in SERVICE_NAME: a replica joining mid-epoch
        (listed once it serves, as a pod once its readiness probe passes)."""
        host = self.net.add_server(listed=False)
        self.start(host)
        self.net.list_in_service(host)
        return host

    def remove_replica(self, host: Host) -> None:
        """Stop `host`'s server and remove the host from the network."""
        if host.name in self._running:
            self.stop(host)
        self.net.remove_host(host)

    def served_batches(self, host: Host) -> int:
        """Batches `host`'s servers (all runs of it) sent in streams that have ended."""
        log = self._logs.get(host.name, "")
        if host.name in self._running:
            log += self._running[host.name][1].stderr()
        return sum(int(m[1]) for m in SERVED.finditer(log))

    def close(self) -> None:
        """Stop every server."""
        for name in list(self._running):
            self.stop(self.net.hosts[name])


class Trainer:
    """tests/netns_trainer.py running one epoch in the trainer namespace (a subprocess with
    a deadline); `records()` are its batches so far, `finish()` waits for all of them."""

    def __init__(self, proc: subprocess.Popen, out: Path, err: Path, deadline: float) -> None:
        self.proc, self.out, self.err, self.deadline = proc, out, err, deadline

    @classmethod
    def start(cls, net: Network, targets: Sequence[str], dataset: str, spec: AugmentSpec, *,
              batch_size: int, out_dir: Path, seed: int = 0, epoch: int = 0,
              step_s: float = 0.0, deadline_s: float = 120.0, **loader: Any) -> Trainer:
        """Start the trainer; `loader` are more AugmentLoader arguments. It is killed if
        still running `deadline_s` from now."""
        out_dir.mkdir(parents=True, exist_ok=True)
        out, err = out_dir / "trainer.jsonl", out_dir / "trainer.stderr"
        out.write_text("")
        cmd = net.trainer.argv(
            sys.executable, str(TRAINER_SCRIPT), "--out", str(out), "--dataset", dataset,
            "--spec", spec.to_json(), "--batch-size", str(batch_size), "--seed", str(seed),
            "--epoch", str(epoch), "--step-s", str(step_s), "--loader", json.dumps(loader),
            "--", *targets)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TRAINER_SCRIPT.parent.parent), env.get("PYTHONPATH")) if p)
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return cls(proc, out, err, time.monotonic() + deadline_s)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()

    def lines(self) -> list[dict[str, Any]]:
        """Every complete JSON line written so far."""
        text = self.out.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines(keepends=True)
                if line.endswith("\n")]

    def records(self) -> list[dict[str, Any]]:
        """The batches delivered so far."""
        return [line for line in self.lines() if "sha256" in line]

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def stats(self) -> dict[str, Any]:
        """The loader's `stats().as_dict()` at the end of a finished epoch (per server
        address: batches, images, bytes, failures, ...)."""
        last = (self.lines() or [{}])[-1]
        assert "stats" in last, f"the trainer has not finished: {self._summary()}"
        return last["stats"]

    def wait_for(self, batches: int) -> None:
        """Block until `batches` batches were delivered; RuntimeError if the trainer ended
        first, TimeoutError (trainer killed) at its deadline."""
        while len(self.records()) < batches:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the trainer ended after {len(self.records())} of the "
                                   f"{batches} batches waited for: {self._summary()}")
            self._check_deadline()
            time.sleep(0.05)

    def finish(self) -> list[dict[str, Any]]:
        """Wait for the trainer to end; its records. AssertionError naming the loader's
        error when it failed, TimeoutError (trainer killed) at its deadline."""
        while self.proc.poll() is None:
            self._check_deadline()
            time.sleep(0.05)
        last = (self.lines() or [{}])[-1]
        assert self.proc.returncode == 0 and last.get("done"), (
            f"the trainer failed after {len(self.records())} batches: {self._summary()}")
        return self.records()

    def kill(self) -> None:
        """SIGKILL the trainer (its whole session) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            self.kill()
            raise TimeoutError(f"the trainer ran past its deadline with "
                               f"{len(self.records())} batches; killed. {self._summary()}")

    def _summary(self) -> str:
        last = (self.lines() or [{}])[-1]
        tail = "\n".join(self.stderr().splitlines()[-30:])
        return (f"exit status {self.proc.returncode}, last line {json.dumps(last)[:2000]}; "
                f"stderr (last 30 lines):\n{tail}")
