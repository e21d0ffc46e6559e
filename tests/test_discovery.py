"""Replica discovery (issue 12.1): one name, every address it resolves to, replicas that
join and leave mid-epoch, and the server's maximum connection age.

Replicas are real `augsvc serve` processes on 127.0.0.2, .3 and .4 (all of 127.0.0.0/8
is loopback on Linux), sharing one port as replicas behind a headless Service do. The
name "augsvc.test" resolves through the loader's `resolve=` hook, a list the test
changes; the system resolver itself is checked on "localhost".
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest
from epochs import engine_batches
from replicas import Replicas, assert_epoch, consume, free_port

from augsvc.client import AugmentLoader
from augsvc.client.discovery import (
    DEFAULT_PORT,
    Discovery,
    Endpoint,
    parse_target,
    resolve_addresses,
)
from augsvc.core.spec import AugmentSpec
from augsvc.engine.synth import make_dataset

pytestmark = pytest.mark.timeout(300)

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False)
NAME, SEED, BATCH = "photos", 5, 4
FAST = ("--dali-threads", "1", "--io-threads", "2")
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


# ---------------------------------------------------------------------------
# names


@pytest.mark.parametrize(("target", "expected"), [
    ("aug-0:50052", ("aug-0", 50052)),
    ("aug-0", ("aug-0", DEFAULT_PORT)),  # no port: augsvc's 50051, not 443
    ("dns:///augsvc-headless.ns.svc:50051", ("augsvc-headless.ns.svc", 50051)),
    ("dns:///augsvc-headless.ns.svc", ("augsvc-headless.ns.svc", DEFAULT_PORT)),
    ("dns:aug-1:7", ("aug-1", 7)),
    ("10.0.0.7:50051", ("10.0.0.7", 50051)),
    ("[::1]:50053", ("::1", 50053)),
    ("[fd00::7]", ("fd00::7", DEFAULT_PORT)),
    ("fd00::7", ("fd00::7", DEFAULT_PORT)),
    (" aug-0:1 ", ("aug-0", 1)),
])
def test_parse_target(target, expected):
    assert parse_target(target) == expected


@pytest.mark.parametrize(("target", "match"), [
    ("", "host:port"),
    ("aug-0:", "no host|port"),
    (":50051", "no host"),
    ("aug-0:http", "port"),
    ("aug-0:70000", "port"),
    ("aug-0:0", "port"),
    ("dns://8.8.8.8/aug-0:50051", "DNS server"),
    ("unix:///tmp/augsvc.sock", "only host:port"),
    ("ipv4:10.0.0.1:50051", "only host:port"),
    ("[::1", r"\[ipv6"),
    ("[::1]x", r"\[ipv6"),
])
def test_parse_target_refuses(target, match):
    with pytest.raises(ValueError, match=match):
        parse_target(target)


def test_system_resolver_on_localhost():
    # one family (IPv4 when there is any), so a dual-stack name counts each server once
    assert resolve_addresses("localhost", 50051) == ["127.0.0.1"]
    assert resolve_addresses("127.0.0.3", 1) == ["127.0.0.3"]
    with pytest.raises(OSError):
        resolve_addresses("no-such-host.invalid", 50051)


def test_discovery_follows_the_name_and_keeps_the_last_answer():
    answers = {"aug.test": ["10.0.0.1", "10.0.0.2"]}
    seen = []

    def resolve(host, port):
        seen.append((host, port))
        if host not in answers:
            raise OSError("NXDOMAIN")
        return answers[host]

    d = Discovery(["dns:///aug.test:7", "10.9.9.9:8"], resolve, interval=30)
    assert d.dynamic
    first = d.resolve()
    assert [e.address for e in first] == ["10.0.0.1:7", "10.0.0.2:7", "10.9.9.9:8"]
    assert first[0] == Endpoint("10.0.0.1:7", "aug.test:7") and first[0].host_name == "aug.test"
    assert first[2].host_name is None  # an address is not looked up
    assert seen == [("aug.test", 7)]
    answers["aug.test"] = ["10.0.0.2", "10.0.0.3", "10.0.0.3"]
    assert [e.address for e in d.resolve()] == ["10.0.0.2:7", "10.0.0.3:7", "10.9.9.9:8"]
    del answers["aug.test"]  # the name stops resolving (every pod restarting): keep the last
    assert [e.address for e in d.resolve()] == ["10.0.0.2:7", "10.0.0.3:7", "10.9.9.9:8"]
    assert "NXDOMAIN" in d.errors["aug.test:7"]
    answers["aug.test"] = []
    d.resolve()
    assert "no address" in d.errors["aug.test:7"]
    now = time.monotonic()
    assert not d.due(now, min_gap=1.0)
    d.request()  # after a failure: soon, but not more often than min_gap
    assert d.due(now + 1.5, min_gap=1.0) and not d.due(now + 0.5, min_gap=1.0)
    assert not Discovery(["10.0.0.1:7"], resolve, 30).dynamic


# ---------------------------------------------------------------------------
# replicas behind one name


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("epoch400"), num_classes=4, per_class=100,
                        size=(48, 64))


@pytest.fixture(scope="module")
def reference(folder: Path) -> list:
    return engine_batches(folder, SPEC, SEED, 0, batch_size=BATCH)


class Names:
    """The loader's resolver: what "augsvc.test" resolves to, changed by the test."""

    def __init__(self, *hosts: str) -> None:
        self.hosts = list(hosts)
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        assert host == "augsvc.test"
        with self.lock:
            return list(self.hosts)

    def set(self, *hosts: str) -> None:
        with self.lock:
            self.hosts = list(hosts)


@pytest.fixture(scope="module")
def replicas(folder: Path):
    """Three servers on 127.0.0.2-4, one port."""
    port = free_port(HOSTS[0])
    with Replicas({NAME: folder}, *FAST) as group:
        servers = {host: group.start(host, port) for host in HOSTS}
        yield group, servers, port


def _addresses(stats) -> dict[str, int]:
    return {a: s.batches for a, s in stats.servers.items()}


def test_one_name_every_replica(replicas, reference):
    _, servers, port = replicas
    names = Names(*HOSTS)
    with AugmentLoader(f"dns:///augsvc.test:{port}", NAME, SPEC, BATCH, SEED,
                       resolve=names) as loader:
        got = consume(loader)
        stats = loader.stats()
    assert_epoch(got, reference)
    assert set(_addresses(stats)) == {s.address for s in servers.values()}
    assert all(n > 0 for n in _addresses(stats).values())  # each address got work
    assert sum(_addresses(stats).values()) == len(reference)


def test_a_replica_that_joins_mid_epoch_gets_work(replicas, reference):
    _, servers, port = replicas
    names = Names(*HOSTS[:2])
    joined = servers[HOSTS[2]].address

    def on_batch(i: int) -> None:
        if i == 10:
            names.set(*HOSTS)  # scale-up: the name now lists a third replica
        time.sleep(0.02)

    with AugmentLoader(f"augsvc.test:{port}", NAME, SPEC, BATCH, SEED, resolve=names,
                       resolve_interval=0.2) as loader:
        got = consume(loader, on_batch)
        stats = loader.stats()
    assert_epoch(got, reference)
    assert _addresses(stats).get(joined, 0) > 0, _addresses(stats)


def test_a_replica_that_leaves_mid_epoch_hands_its_work_back(replicas, reference, caplog):
    group, servers, port = replicas
    names = Names(*HOSTS)
    leaving = servers[HOSTS[2]]
    counts = {}

    def on_batch(i: int) -> None:
        if i == 30:
            names.set(*HOSTS[:2])  # scale-down: the name drops it, then it goes away
            leaving.kill()
            counts["at removal"] = loader.stats().servers[leaving.address].batches
        time.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="augsvc.client"), AugmentLoader(
            f"augsvc.test:{port}", NAME, SPEC, BATCH, SEED, resolve=names,
            resolve_interval=0.2) as loader:
        got = consume(loader, on_batch)
        stats = loader.stats()
    assert_epoch(got, reference)
    assert counts["at removal"] > 0  # it was working when it left
    # then no more than what its calls in flight (2 streams x 2 batches) had received
    assert stats.servers[leaving.address].batches <= counts["at removal"] + 4
    deadline = time.monotonic() + 10
    while [t for t in threading.enumerate() if leaving.address in t.name]:
        assert time.monotonic() < deadline, "its streams did not end"
        time.sleep(0.1)
    assert any("left augsvc.test" in r.getMessage() for r in caplog.records)
    servers[HOSTS[2]] = group.start(HOSTS[2], port)  # back, for the other tests


def test_max_connection_age_is_routine(folder, reference, caplog):
    """GOAWAY every ~0.5 s: no warning, no retry, the same batches."""
    with Replicas({NAME: folder}, *FAST, "--max-connection-age", "0.5",
                  "--log-level", "debug") as group:
        server = group.start()
        with caplog.at_level(logging.INFO, logger="augsvc.client"), AugmentLoader(
                server.address, NAME, SPEC, BATCH, SEED) as loader:
            got = consume(loader, lambda i: time.sleep(0.02))
            stats = loader.stats()
        peers = set(re.findall(r"ipv4:127\.0\.0\.1:(\d+)", server.stderr()))
    assert_epoch(got, reference)
    assert len(peers) > 4, peers  # the connections were recycled several times
    assert stats.retries == 0 and stats.failovers == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
