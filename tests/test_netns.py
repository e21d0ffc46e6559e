"""AugmentLoader across hosts: a trainer and three server hosts in network namespaces.

Real `augsvc serve` processes in server namespaces, the real loader in the trainer
namespace (tests/netns_trainer.py, a subprocess), real JPEGs; every batch's sha256 is
compared with the in-process engine. Needs root and iproute2 (nftables and tc for the
loss test); skipped with the reason otherwise (CI runs as root: there they run). The
harness is tests/netns.py. This kernel has no netem: there is no added delay.

The trainer sleeps `STEP_S` per batch (a training step), so the faults land mid-epoch;
its loader's `timeout` is 3 s (default 60 s): how long a silent server is waited for.

For discovery tests: the `service_target` fixture is one name:port for every server host,
`add_replica()` adds a serving host to it (mid-epoch when called while a trainer runs),
`network.list_in_service(host, False)` takes one out of the name, and
`cluster.served_batches(host)` then tells whether the host got work. The loader resolves a
name itself (augsvc.client.discovery: getaddrinfo, every address in the hosts file), again
every `RESOLVE_S` in the scaling tests (its `resolve_interval`, default 30 s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from epochs import assert_same_epoch, engine_records

from augsvc.core.spec import AugmentSpec
from augsvc.engine.synth import make_dataset

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

NAME = "photos"
SPEC = AugmentSpec(size=(32, 32))  # the full default chain, small outputs
BATCH = 4
SEED = 11
STEP_S = 0.1
LOADER = {"timeout": 3.0}
RESOLVE_S = 0.5  # the scaling tests' resolve_interval
# batches still to come when the replica set changes: well over the read-ahead already
# handed out (batches_per_request + 1 = 3 per stream: 24 with four replicas of 2 streams)
MARGIN = 40


@pytest.fixture(scope="module")
def network():
    """A trainer host and three server hosts (skipped where namespaces cannot be made)."""
    why = netns.unavailable("ip")
    if why:
        pytest.skip(f"netns tests need root and iproute2: {why}")
    with netns.Network(servers=3) as net:
        yield net


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """480 samples: 24 small JPEGs (3 classes) listed 20 times in a manifest (120 batches)."""
    root = make_dataset(tmp_path_factory.mktemp("netns_data"), num_classes=3, per_class=8,
                        size=(96, 128))
    files = sorted(root.glob("*/*.jpg"))
    manifest = root / "epoch.csv"
    rows = [f"{f},{int(f.parent.name.split('_')[-1])}\n" for f in files] * 20
    manifest.write_text("path,label\n" + "".join(rows))
    return manifest


@pytest.fixture(scope="module")
def cluster(network, dataset):
    """`augsvc serve` on each server host, shared by the module (tests heal what they break)."""
    with netns.Cluster(network, {NAME: dataset}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference(dataset):
    """reference(epoch, spec) -> the in-process engine's records of that epoch (cached)."""
    cache = {}

    def records(epoch: int, spec: AugmentSpec = SPEC) -> list[dict]:
        key = (epoch, spec.to_json())
        if key not in cache:
            cache[key] = engine_records(dataset, spec, SEED, epoch, BATCH)
        return cache[key]

    return records


@pytest.fixture
def service_target(cluster) -> str:
    """One name:port that resolves to every server host (the hosts files), for discovery."""
    return cluster.service_target


@pytest.fixture
def add_replica(cluster):
    """add_replica() -> a new server host, serving and in the service name: a replica that
    joins (mid-epoch, when called while a trainer runs). Removed after the test."""
    added = []

    def add() -> netns.Host:
        added.append(cluster.add_replica())
        return added[-1]

    yield add
    for host in added:
        cluster.remove_replica(host)


def trainer(network, cluster, tmp_path, epoch, spec=SPEC, targets=None, **kwargs
            ) -> netns.Trainer:
    """Start the trainer on `targets` (default: every server host's address)."""
    kwargs = {"step_s": STEP_S, **LOADER, **kwargs}
    return netns.Trainer.start(network, targets or cluster.addresses, NAME, spec,
                               batch_size=BATCH, seed=SEED, epoch=epoch, out_dir=tmp_path,
                               **kwargs)


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_name_resolves_to_every_server_host(network, service_target, add_replica):
    """The harness: the service name gives every server host inside the trainer namespace,
    and a process already running there sees a host that joins later (hosts files in place)."""
    name, port = service_target.rsplit(":", 1)
    lookup = ("import socket, sys\n"
              "for _ in sys.stdin:\n"
              f"    infos = socket.getaddrinfo({name!r}, {port}, type=socket.SOCK_STREAM)\n"
              "    print(' '.join(sorted(i[4][0] for i in infos)), flush=True)\n")
    proc = subprocess.Popen(network.trainer.argv(sys.executable, "-c", lookup),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def resolve() -> list[str]:
            proc.stdin.write("\n")
            proc.stdin.flush()
            return proc.stdout.readline().split()

        assert resolve() == sorted(h.address for h in network.servers)
        replica = add_replica()
        assert len(network.servers) == 4 and replica.address in resolve()
        assert resolve() == sorted(h.address for h in network.servers)
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_epoch_through_the_name(network, cluster, service_target, reference, tmp_path):
    """The loader given the service name instead of addresses: the engine's epoch."""
    with trainer(network, cluster, tmp_path, epoch=4, targets=[service_target],
                 step_s=0.0) as run:
        assert_same_epoch(run.finish(), reference(4))


def test_full_epoch_over_the_network(network, cluster, reference, tmp_path):
    """One epoch from three server hosts, listed by address, is the engine's epoch."""
    before = {h.name: cluster.served_batches(h) for h in network.servers}
    with trainer(network, cluster, tmp_path, epoch=0, step_s=0.0) as run:
        assert_same_epoch(run.finish(), reference(0))
    for host in network.servers:  # the streams spread over every host
        assert wait_until(lambda h=host: cluster.served_batches(h) > before[h.name]), host


@pytest.mark.parametrize("how", ["link", "nft"])
def test_partition_one_host_then_heal(network, cluster, reference, tmp_path, how):
    """A server host cut off mid-epoch (link down / every packet dropped) for longer than
    the loader's timeout, then healed: nothing lost, nothing duplicated, same bytes."""
    host = network.servers[1]
    with trainer(network, cluster, tmp_path, epoch=1) as run:
        run.wait_for(20)
        network.partition(host, how)
        try:
            time.sleep(2 * LOADER["timeout"])
        finally:
            network.heal(host)
        at_heal = len(run.records())
        records = run.finish()
    assert at_heal < len(records), "the epoch ended before the host was healed"
    assert_same_epoch(records, reference(1))
    cut = [line for line in run.stderr().splitlines()
           if f"augsvc-stream-{host.target()}-" in line and "handed back" in line]
    assert cut, f"the partition cut no stream of {host.name} mid-batch: {run.stderr()[-3000:]}"


def test_rolling_restart_of_every_host(network, cluster, reference, tmp_path):
    """Each server host restarted in turn mid-epoch, the next once the last serves again
    (down 2 s, as a pod being replaced): the epoch completes with the engine's bytes."""
    want = reference(2)
    # 0.6 s a batch: three restarts (each waits for the host to serve again, slow on a
    # loaded machine) fit well inside the 120-batch epoch
    with trainer(network, cluster, tmp_path, epoch=2, step_s=0.6) as run:
        run.wait_for(5)
        for host in network.servers:
            cluster.stop(host)
            if len(want) - len(run.records()) <= 20:  # the read-ahead could hide the restart
                pytest.fail(f"the epoch was nearly over when {host.name} stopped: "
                            f"{len(run.records())} of {len(want)} batches")
            time.sleep(2.0)
            cluster.start(host)
        records = run.finish()
    assert_same_epoch(records, want)


def test_loss_and_rate_limit(network, cluster, reference, tmp_path):
    """0.1 % of the trainer's packets dropped each way and its link held to 50 Mbit/s
    (tc tbf): the epoch is still the engine's, byte for byte."""
    why = netns.unavailable("nft", "tc")
    if why:
        pytest.skip(f"needs nftables and tc: {why}")
    spec = SPEC.replace(size=(112, 112))  # 37 KB per image: ~18 MB, ~13k packets
    want = reference(3, spec)
    network.add_loss(network.trainer, per_mille=1)
    network.limit_rate(network.trainer, 50_000_000)
    try:
        with trainer(network, cluster, tmp_path, epoch=3, spec=spec, step_s=0.0) as run:
            records = run.finish()
        dropped = network.dropped_packets(network.trainer)
    finally:
        network.remove_rate_limit(network.trainer)
        network.remove_loss(network.trainer)
    assert dropped > 0, "the loss rule dropped nothing"
    assert_same_epoch(records, want)


def served_by(stats: dict, host: netns.Host) -> int:
    """Batches the trainer's loader received from `host` (its `loader.stats()`)."""
    return stats["servers"].get(host.target(), {}).get("batches", 0)


def assert_each_batch_received_once(stats: dict, want: list[dict]) -> None:
    """The loader's per-server counts add up to the epoch: nothing received twice."""
    per_server = {a: s["batches"] for a, s in stats["servers"].items()}
    assert sum(per_server.values()) == len(want), per_server


def test_a_replica_added_mid_epoch_receives_batches(network, cluster, service_target,
                                                    add_replica, reference, tmp_path):
    """Scale-up: a fourth replica starts and joins the name mid-epoch; the loader (looking
    the name up every RESOLVE_S) gives it work, and the epoch is still the engine's."""
    want = reference(5)
    with trainer(network, cluster, tmp_path, epoch=5, targets=[service_target],
                 resolve_interval=RESOLVE_S) as run:
        run.wait_for(10)
        replica = add_replica()
        if len(want) - len(run.records()) <= MARGIN:
            pytest.fail(f"the epoch was nearly over when {replica.name} joined: "
                        f"{len(run.records())} of {len(want)} batches")
        records = run.finish()
    stats = run.stats()
    assert_same_epoch(records, want)
    assert f"augsvc server {replica.target()} joined" in run.stderr()
    received = served_by(stats, replica)
    assert received > 0, f"{replica.name} got no batch: {stats['servers']}"
    assert_each_batch_received_once(stats, want)
    # its own log: it sent at least what the loader counted (a call cut short may send more)
    assert wait_until(lambda: cluster.served_batches(replica) >= received), (
        cluster.served_batches(replica), received)


@pytest.mark.parametrize("seen", ["before_the_stop", "through_its_failures"])
def test_a_replica_removed_mid_epoch_hands_its_work_back(network, cluster, service_target,
                                                         add_replica, reference, tmp_path,
                                                         seen):
    """Scale-down: one of four replicas is taken out of the name mid-epoch, then stopped
    (SIGTERM). Either the loader's next lookup (every RESOLVE_S) sees it leave before the
    stop: its streams finish their calls and retire, no call fails. Or the stop comes
    first (the loader looks only every 60 s, as when DNS lags behind the SIGTERM): its
    calls are refused, hand their batches back, and the failure makes the loader look
    again and retire it. Either way the epoch is the engine's, and the loader received
    from it no more than its own log says it sent."""
    want = reference(6)
    leaving = add_replica()
    interval = RESOLVE_S if seen == "before_the_stop" else 60.0
    with trainer(network, cluster, tmp_path, epoch=6, targets=[service_target],
                 resolve_interval=interval) as run:
        assert wait_until(lambda: cluster.served_batches(leaving) > 0, 30), (
            f"{leaving.name} got no work before it was to leave")
        run.wait_for(10)
        network.list_in_service(leaving, False)
        if seen == "before_the_stop":
            assert wait_until(lambda: f"augsvc server {leaving.target()} left" in run.stderr())
        assert cluster.stop(leaving) == 0
        if len(want) - len(run.records()) <= MARGIN:
            pytest.fail(f"the epoch was nearly over when {leaving.name} stopped: "
                        f"{len(run.records())} of {len(want)} batches")
        sent = cluster.served_batches(leaving)  # final: its server has exited
        records = run.finish()
    stats = run.stats()
    assert_same_epoch(records, want)
    assert f"augsvc server {leaving.target()} left" in run.stderr()
    assert 0 < served_by(stats, leaving) <= sent, (served_by(stats, leaving), sent)
    assert_each_batch_received_once(stats, want)
    failures = stats["servers"][leaving.target()]["failures"]
    if seen == "before_the_stop":  # a clean scale-down costs no failure
        assert failures == 0, stats["servers"]
    else:
        assert failures > 0 and stats["failovers"] > 0, stats
