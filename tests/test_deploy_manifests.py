"""deploy/compose.yaml and deploy/k8s/, checked offline: the Compose specification's schema
(docker-compose 1.29.2's, vendored in tests/schemas), Kubernetes 1.29 and the newest
schemas kubernetes-validate bundles (strict: unknown fields fail), and every augsvc flag,
port, path and name they use against the real CLI parser, the Dockerfile and each other.

The kustomize overlays are rendered with `kubectl kustomize` (skipped, saying so, without
kubectl); the base's manifests are checked as files either way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from imagebuild import DOCKERFILE, dockerfile_instructions
from serverproc import REPO_ROOT

from augsvc import wire
from augsvc.cli import build_parser
from augsvc.cli.serve import _datasets
from augsvc.server import exporter
from augsvc.server.supervisor import STOP_MARGIN

pytestmark = pytest.mark.deploy

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose_spec.json"
COMPOSE_SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
OVERLAYS = {"gpu": ("overlays/gpu",), "cpu": ("overlays/cpu",),
            "gpu+tls": ("overlays/gpu", "components/tls"),
            "cpu+tls": ("overlays/cpu", "components/tls")}
WRITABLE = ("/tmp", "/home/augsvc/.cache")  # what a read-only root file system must mount


# ---------------------------------------------------------------------------- helpers


def image_facts() -> dict:
    """What deploy/Dockerfile's runtime stage sets: entrypoint, CMD, user, ports, health."""
    facts: dict = {"expose": set()}
    for instruction, args in dockerfile_instructions(DOCKERFILE):
        if instruction in ("ENTRYPOINT", "CMD"):
            facts[instruction.lower()] = json.loads(args)
        elif instruction == "USER":
            facts["uid"] = int(args.split(":")[0])
        elif instruction == "EXPOSE":
            facts["expose"] |= {int(port) for port in args.split()}
        elif instruction == "HEALTHCHECK":
            command = json.loads(args[args.index("CMD") + 3:])
            facts["health"] = command[1:]
    return facts


def strict_parser() -> argparse.ArgumentParser:
    """`build_parser()` with abbreviations off: a flag must be spelled as the CLI has it."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser


def parse(argv: list[str], files: dict[str, str], tmp_path: Path) -> argparse.Namespace:
    """`augsvc ARGV` through the real parser; @PATH arguments read `files[PATH]` (the
    container's file) through argparse's own @file reading. AssertionError if it fails."""
    expanded = []
    for i, arg in enumerate(argv):
        if arg.startswith("@"):
            assert arg[1:] in files, f"{arg}: no mounted file provides it"
            local = tmp_path / f"args-{i}"
            local.write_text(files[arg[1:]])
            arg = f"@{local}"
        expanded.append(arg)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return strict_parser().parse_args(expanded)
    except SystemExit as exc:
        raise AssertionError(f"augsvc {' '.join(argv)}: {err.getvalue().strip()}") from exc


def under(path: str, mounts: dict[str, object]) -> object:
    """The mount whose path holds `path` (the deepest one), or AssertionError."""
    found = [m for m in mounts if PurePosixPath(path).is_relative_to(m)]
    assert found, f"{path} is under none of the mounts {sorted(mounts)}"
    return mounts[max(found, key=len)]


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60}
    return float(duration[:-1]) * units[duration[-1]]


def test_strict_parser_refuses_abbreviations(tmp_path: Path) -> None:
    assert parse(["serve", "--dataset=a=/b", "--workers=2"], {}, tmp_path).workers == 2
    with pytest.raises(AssertionError, match="unrecognized arguments: --worker=2"):
        parse(["serve", "--dataset=a=/b", "--worker=2"], {}, tmp_path)


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_flags_and_ports(tmp_path: Path) -> None:
    image = image_facts()
    assert image["entrypoint"] == ["augsvc", "serve"]
    args = parse(image["entrypoint"][1:] + image["cmd"], {}, tmp_path)
    assert args.host == "0.0.0.0" and args.metrics_port is not None
    assert image["expose"] == {args.port, args.health_port, args.metrics_port}
    health = parse(image["health"], {}, tmp_path)
    assert health.target == f"127.0.0.1:{args.health_port}" and health.service == ""
    assert image["uid"] != 0


# ---------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_schema_is_the_vendored_file() -> None:
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256


def test_compose_validates_against_the_compose_spec(compose: dict) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)  # the draft its $schema names
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose)]
    assert errors == []
    # the validator does reject: an unknown key, a wrong type
    for path, value in ((("services", "server", "gpus"), "all"),
                        (("services", "server", "deploy", "resources", "reservations",
                          "devices", 0, "count"), [1])):
        broken = copy.deepcopy(compose)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert not validator.is_valid(broken), path


def test_compose_names_what_it_declares(compose: dict) -> None:
    for name, service in compose["services"].items():
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], (name, secret)
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"], (name, config)
        for volume in service.get("volumes", []):
            if volume["type"] == "volume":
                assert volume["source"] in compose["volumes"], (name, volume)
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for config in compose["configs"].values():
        assert (DEPLOY / config["file"]).is_file(), config


def _compose_args(compose: dict, name: str, image: dict, tmp_path: Path) -> argparse.Namespace:
    """Service `name`'s augsvc arguments, through the real parser (its @FILE configs read)."""
    service = compose["services"][name]
    files = {c["target"]: (DEPLOY / compose["configs"][c["source"]]["file"]).read_text()
             for c in service.get("configs", [])}
    argv = service.get("entrypoint", image["entrypoint"])[1:] + service["command"]
    return parse(argv, files, tmp_path)


@pytest.mark.parametrize("name", ["server", "server-cpu", "bench", "bench-server", "stats"])
def test_compose_commands_use_real_flags(compose: dict, name: str, tmp_path: Path) -> None:
    service = compose["services"][name]
    image = image_facts()
    args = _compose_args(compose, name, image, tmp_path)
    mounts = {v["target"]: v for v in service["volumes"]}
    gpu = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert (getattr(args, "device", None) == "gpu") == bool(gpu), "GPU reserved iff --device gpu"
    if gpu:
        assert gpu["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    if args.command == "serve":
        assert parse(image["health"], {}, tmp_path).target == f"127.0.0.1:{args.health_port}"
        published = [p.split(":") for p in service["ports"]]
        assert [p[-1] for p in published] == [str(args.port), str(args.metrics_port)]
        assert all(len(set(p)) == 1 for p in published)  # each on the host's same port
        assert str(args.token_file) == f"/run/secrets/{service['secrets'][0]}"
        datasets, stats = _datasets(args.dataset)
        for path in [*datasets.values(), *stats.values()]:
            assert under(str(path), mounts)["read_only"], path
        if name == "server":  # the statistics it reads are the ones `stats` writes
            prepare = compose["services"]["stats"]
            out = parse(prepare["entrypoint"][1:] + prepare["command"], {}, tmp_path).out
            assert out == stats["imagenet"]
            theirs = {v["target"]: v["source"] for v in prepare["volumes"]}
            assert theirs[str(out.parent)] == mounts[str(stats["imagenet"].parent)]["source"]
        assert service["read_only"]
        for path in WRITABLE:
            assert path in service["tmpfs"] or mounts[path]["type"] == "volume", path
        assert seconds(service["stop_grace_period"]) >= args.grace + STOP_MARGIN
    elif args.command == "bench" and args.server:  # against the running `server`
        host, _, port = args.server[0].rpartition(":")
        theirs = _compose_args(compose, host, image, tmp_path)
        assert int(port) == theirs.port and args.server_dataset in _datasets(theirs.dataset)[0]
        assert service["secrets"] == compose["services"][host]["secrets"]
        assert str(args.token_file) == str(theirs.token_file)
        assert under(str(args.json), mounts)["type"] == "bind"
    elif args.command == "bench":
        assert under(str(args.dataset), mounts)["read_only"]
        assert under(str(args.json), mounts)["type"] == "bind"
    else:
        assert under(str(args.path), mounts)["read_only"]
        assert "read_only" not in under(str(args.out), mounts)


# ---------------------------------------------------------------------------- kubernetes


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(docs: list[dict]) -> None:
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} against "
                                     f"Kubernetes {version}: {exc}") from None


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_validates_strictly(path: Path) -> None:
    validate(load_all(path))


def test_k8s_base_lists_its_manifests() -> None:
    listed = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in (K8S / "base").glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def render(parts: tuple[str, ...], tmp_path: Path) -> list[dict]:
    """`kubectl kustomize` of an overlay, plus components, in a scratch kustomization."""
    if shutil.which("kubectl") is None:
        pytest.skip("rendering the kustomize overlays needs kubectl (its built-in kustomize)")
    tmp_path.mkdir()
    rel = [os.path.relpath(K8S / p, tmp_path) for p in parts]  # kustomize: relative only
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": rel[:1], "components": rel[1:]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def base_docs() -> list[dict]:
    resources = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    return [d for name in resources for d in load_all(K8S / "base" / name)]


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_k8s_variant_is_consistent(variant: str, tmp_path: Path) -> None:
    if variant == "base":
        docs = base_docs()
    else:
        docs = render(OVERLAYS[variant], tmp_path / "render")
        validate(docs)
    check_server(docs, variant, tmp_path)


def check_server(docs: list[dict], variant: str, tmp_path: Path) -> None:
    """Flags, ports, probes, mounts, selectors and grace of the rendered servers."""
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    (sts,) = by_kind["StatefulSet"].values()
    pod = sts["spec"]["template"]
    labels, spec = pod["metadata"]["labels"], pod["spec"]
    (container,) = spec["containers"]
    image = image_facts()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] | {"readOnly": m.get("readOnly", False)}
              for m in container["volumeMounts"]}
    files = {}
    for path, volume in mounts.items():
        if "configMap" in volume:
            data = by_kind["ConfigMap"][volume["configMap"]["name"]]["data"]
            files |= {f"{path}/{key}": text for key, text in data.items()}
    args = parse(image["entrypoint"][1:] + container["args"], files, tmp_path)

    device = variant.split("+")[0]
    assert args.device == ("auto" if device == "base" else device)
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if device == "gpu" else None)
    assert ("--tls-cert" in " ".join(container["args"])) == variant.endswith("+tls")
    for path in (args.token_file, args.tls_cert, args.tls_key):
        if path is not None:
            assert "secret" in under(str(path), mounts), path
    datasets, stats = _datasets(args.dataset)
    for path in [*datasets.values(), *stats.values()]:
        volume = under(str(path), mounts)
        assert volume["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
        assert volume["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"]
    prepare = prepare_job_args(tmp_path)
    assert stats["imagenet"] == prepare.out and datasets["imagenet"] == prepare.path

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "health": args.health_port, "metrics": args.metrics_port}
    annotations = pod["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(args.metrics_port),
                           "prometheus.io/path": exporter.PATH}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.health_port, probe
    ready = container["readinessProbe"]
    assert ready["grpc"]["service"] == wire.SERVICE_NAME
    # The drain's order against the probes (deploy/README.md): from SIGTERM on, health is
    # NOT_SERVING and new streams are refused (retried elsewhere) while running ones get
    # --grace. Readiness turns the pod unready well inside --grace (a failing probe within
    # one period, `failureThreshold` of them); liveness never kills a draining pod, which
    # exits within --grace + the stop margin, all before Kubernetes' SIGKILL.
    assert ready["periodSeconds"] * (ready["failureThreshold"] + 1) <= args.grace / 2
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > args.grace + STOP_MARGIN
    assert spec["terminationGracePeriodSeconds"] >= args.grace + STOP_MARGIN

    assert spec["securityContext"]["runAsNonRoot"]
    assert spec["securityContext"]["runAsUser"] == image["uid"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    for path in WRITABLE:
        assert "emptyDir" in mounts[path], path

    services = by_kind["Service"]
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == args.port == port["port"]
    (pdb,) = by_kind["PodDisruptionBudget"].values()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()


def prepare_job_args(tmp_path: Path) -> argparse.Namespace:
    (job,) = load_all(K8S / "prepare-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return parse(container["command"][1:] + container["args"], {}, tmp_path)


def test_k8s_prepare_job_and_example_secrets(tmp_path: Path) -> None:
    (job,) = load_all(K8S / "prepare-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = prepare_job_args(tmp_path)
    assert args.command == "stats"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] | {"readOnly": m.get("readOnly", False)}
              for m in container["volumeMounts"]}
    images = under(str(args.path), mounts)
    assert not images["readOnly"]  # it writes the statistics and the index beside the images
    (pvc,) = [d for d in base_docs() if d["kind"] == "PersistentVolumeClaim"]
    assert images["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    # the example Secrets: the names and keys the StatefulSet and the TLS component mount,
    # left empty so that applying them unfilled keeps the server from starting
    secrets = {d["metadata"]["name"]: d for d in load_all(K8S / "secrets.example.yaml")}
    assert set(secrets["augsvc-token"]["stringData"]) == {"token"}
    assert set(secrets["augsvc-tls"]["stringData"]) == {"tls.crt", "tls.key"}
    assert all(v == "" for s in secrets.values() for v in s["stringData"].values())
