"""deploy/Dockerfile built with buildah from a clean tree, then run: its config, health from
the host, a full epoch equal to the in-process engine's, the non-root user, SIGTERM.

Needs root, buildah, debootstrap and git (`make install` installs them as root); skips,
naming what is missing, otherwise. The first run debootstraps the base image and builds
cold (minutes, downloads from PyPI and Debian); reruns reuse ~/.cache/augsvc/deploy and
buildah's layer cache. The build time and image size are printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from imagebuild import (
    DOCKERFILE,
    Buildah,
    cache_dir,
    clean_context,
    descendants,
    dockerfile_bases,
    kill_tree,
    missing_tools,
)
from prometheus_client.parser import text_string_to_metric_families
from serverproc import REPO_ROOT, running_server

import augsvc
from augsvc.cli import build_parser
from augsvc.client import AugmentLoader
from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import FOLDER_CACHE_NAME, open_dataset
from augsvc.engine.statistics import load_stats
from augsvc.server import exporter

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(1800)]

TAG = "localhost/augsvc:deploy-test"
SPEC = AugmentSpec(size=(64, 64), stats="dataset")  # crop, flip, HSV and PCA: the plugin runs
SEED, BATCH = 5, 4


def _report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in pytest's output even when output is captured."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def _pip_secrets(tmp: Path) -> dict[str, Path]:
    """The build secrets that make pip in the build trust the CAs this machine trusts
    (a TLS-intercepting proxy's, here) and retry patiently."""
    candidates = (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                  ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt")
    ca = next((c for c in candidates if c and Path(c).is_file()), None)
    conf = tmp / "pip.conf"
    lines = ["[global]", "timeout = 120", "retries = 10"]
    secrets = {"pip.conf": conf}
    if ca:
        lines.append("cert = /run/secrets/pip-ca.crt")
        secrets["pip-ca.crt"] = Path(ca)
    conf.write_text("\n".join(lines) + "\n")
    return secrets


@pytest.fixture(scope="module")
def buildah() -> Buildah:
    missing = missing_tools()
    if missing:
        pytest.skip(f"building the deploy image needs {'; '.join(missing)}")
    return Buildah(cache_dir())


@pytest.fixture(scope="module")
def image(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> str:
    """The image, built from a clean copy of the tree; build time and size reported."""
    tmp = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    buildah.ensure_base(dockerfile_bases(DOCKERFILE))
    base_seconds = time.monotonic() - started
    seconds = buildah.build(clean_context(tmp / "context"), TAG, tmp / "build.log",
                            _pip_secrets(tmp))
    _report(request, f"deploy image {TAG}: base image {base_seconds:.0f} s, buildah bud "
            f"{seconds:.0f} s, size {buildah.image_bytes(TAG) / 1e6:.0f} MB "
            f"(cache: {cache_dir()})")
    return TAG


@pytest.fixture(scope="module")
def config(buildah: Buildah, image: str) -> dict:
    return buildah.inspect(image)["Docker"]["config"]


def _serve_args(config: dict):
    return build_parser().parse_args(["serve", *config["Cmd"]])


def test_dockerfile_bases_are_bookworm_slim() -> None:
    assert dockerfile_bases(DOCKERFILE) == {"docker.io/library/debian:bookworm-slim"}
    version = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert version and version[1] == augsvc.__version__  # the label stays true


def test_image_config(config: dict, buildah: Buildah, image: str) -> None:
    assert config["Entrypoint"] == ["augsvc", "serve"]
    args = _serve_args(config)
    assert (args.host, args.port, args.health_port, args.metrics_port) == (
        "0.0.0.0", 50051, 50052, 50053)
    assert set(config["ExposedPorts"]) == {"50051/tcp", "50052/tcp", "50053/tcp"}
    assert config["Healthcheck"]["Test"] == ["CMD", "augsvc", "health", "127.0.0.1:50052"]
    build_parser().parse_args(config["Healthcheck"]["Test"][2:])  # a valid command line
    user, _, group = config["User"].partition(":")
    assert user.isdigit() and int(user) != 0 and group.isdigit() and int(group) != 0
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == augsvc.__version__
    for key in ("title", "description", "licenses"):
        assert labels[f"org.opencontainers.image.{key}"]
    env = dict(item.split("=", 1) for item in config["Env"])
    with buildah.container(image) as ctr:
        info = buildah.exec(ctr, "cat", str(Path(env["AUGSVC_KERNEL_LIB"]).parent
                                             / "build-info.json"))
        tools = buildah.exec(ctr, "sh", "-c", "for t in g++ nvcc pip pip3 apt-get; do "
                             "command -v $t; done; python3 --version; id -u")
    build = json.loads(info.stdout)
    assert build["gpu"] and build["dali"] == "2.4.0"
    assert {"code=sm_80", "code=sm_90", "code=compute_90"} <= {
        g.split(",")[-1] for g in build["gencode"]}
    lines = tools.stdout.split()
    assert lines == ["/usr/bin/apt-get", "Python", lines[2], user], tools  # no compiler, no pip
    assert lines[2].startswith("3.11.")


def test_image_serves_an_epoch_equal_to_the_engine(
        buildah: Buildah, config: dict, tmp_path: Path) -> None:
    from augsvc.engine.synth import make_dataset

    data = make_dataset(tmp_path / "photos", num_classes=3, per_class=4)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-m", "augsvc", "stats", str(data)], check=True,
                   capture_output=True, env=env, timeout=120)
    (data / FOLDER_CACHE_NAME).unlink()  # the server, on a read-only mount, caches its own
    name, _, mounted = _serve_args(config).dataset[-1].partition("=")
    with buildah.container(TAG) as ctr:
        command = [*buildah.run_command(ctr, volumes=(f"{data}:{mounted}:ro",)),
                   *config["Entrypoint"], *config["Cmd"]]
        with running_server({}, "--health-port", "0", "--metrics-port", "0", "--dali-threads",
                            "1", command=command, timeout=180) as server:
            try:
                _check_running(buildah, ctr, server, name, data, config)
            finally:
                kill_tree(server.proc)
        # What a read-only root file system must leave writable (the emptyDirs and tmpfs
        # of deploy/k8s and compose): the index cache and /tmp; /data and /run are the
        # mount points `buildah run` made.
        allowed = ("/home/augsvc/.cache", "/tmp", mounted, "/run")  # and below them
        written = buildah.written(ctr)
        assert any(p.startswith("/home/augsvc/.cache/augsvc/index") for p in written), written
        assert [p for p in written if not any(p == a or p.startswith(a + "/")
                                              for a in allowed)] == []


def _check_running(buildah: Buildah, ctr: str, server, name: str, data: Path,
                   config: dict) -> None:
    address = f"127.0.0.1:{server.port}"
    health_address = f"127.0.0.1:{server.health_port}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for target in (address, health_address):  # from the host
        health = subprocess.run([sys.executable, "-m", "augsvc", "health", target],
                                capture_output=True, text=True, env=env, timeout=60)
        assert (health.returncode, health.stdout.strip()) == (0, f"{target}: SERVING")
    inside = buildah.exec(ctr, *config["Healthcheck"]["Test"][1:-1], health_address)
    assert inside.returncode == 0, inside.stderr  # the HEALTHCHECK's command, in the image

    processes = [p for p in descendants(server.proc.pid) if _comm(p) == "augsvc"]
    parent = next(p for p in processes if _ppid(p) not in processes)
    assert len(processes) == 2  # the parent and its one worker
    metrics = [p for p in descendants(server.proc.pid) if _comm(p) == exporter.NAME]
    assert len(metrics) == 1  # --metrics-port's process
    user = int(config["User"].partition(":")[0])
    for pid in processes + metrics:
        assert _uids(pid) == [user] * 4, f"pid {pid} runs as {_uids(pid)}"

    with AugmentLoader(address, name, SPEC, batch_size=BATCH, seed=SEED,
                       return_meta=True) as loader:
        got = list(loader)
    index = open_dataset(data)
    plan = EpochPlan(len(index), BATCH, SEED, 0)
    engine = Augmenter(index, SPEC, load_stats(index, SPEC.stats), max_batch_size=BATCH,
                       device="cpu", num_threads=1)
    try:
        want = [engine.run_batch(SEED, 0, plan.batch(k)) for k in range(len(plan))]
    finally:
        engine.close()
    assert len(got) == len(want) == 3
    for (images, labels, meta), w in zip(got, want, strict=True):
        np.testing.assert_array_equal(meta.sample_ids, w.sample_ids)
        np.testing.assert_array_equal(labels, w.labels)
        assert images.shape == (BATCH, 64, 64, 3)
        assert np.array_equal(images, w.images), f"batch {meta.index} differs"
    # the server counts a batch once gRPC has taken its last frame, which can be a moment
    # after the loader has it: poll until the count settles on the epoch
    url = f"http://127.0.0.1:{server.metrics_port}{exporter.PATH}"  # from the host
    deadline = time.monotonic() + 10
    while (sent := _sent_images(url)) != {name: len(index)} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sent == {name: len(index)}

    os.kill(parent, signal.SIGTERM)  # what `docker stop` sends the entrypoint
    assert server.proc.wait(60) == 0, server.stderr()
    assert not [p for p in processes if os.path.exists(f"/proc/{p}")]
    assert "Traceback" not in server.stderr()


def _sent_images(url: str) -> dict[str, float]:
    """augsvc_sent_images_total by dataset, scraped from the metrics endpoint at `url`."""
    with urllib.request.urlopen(url, timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    return {s.labels["dataset"]: s.value for family in families for s in family.samples
            if s.name == "augsvc_sent_images_total"}


def _comm(pid: int) -> str:
    """The process's name: "augsvc" for the console script and its forked workers."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")
