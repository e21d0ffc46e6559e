"""`pip install augsvc` without extras: a fresh venv with the base dependencies alone.

The package is built from this tree and installed into a new `python -m venv` by its own
pip (pip's configuration and cache; no extras). In that venv the numpy loader iterates a
real server started from the full environment and gets the same bytes as this one; the
server-side commands and `output="torch"` say which extra to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import REPO_ROOT, running_server

from augsvc.client import AugmentLoader
from augsvc.core.spec import AugmentSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVER_PARTS = ("nvidia", "PIL", "matplotlib", "grpc_health", "grpc_reflection", "torch")
SPEC = {"size": [32, 32], "hsv": False, "pca": False}
ITERATE = """
import hashlib, importlib.util, json, sys
import augsvc
from augsvc import AugmentLoader, AugmentSpec

out = {"augsvc": augsvc.__file__,
       "absent": [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is None]}
spec = AugmentSpec.from_dict(json.loads(sys.argv[3]))
with AugmentLoader(sys.argv[1], "photos", spec, batch_size=4, seed=7, return_meta=True) as loader:
    out["batches"] = [[hashlib.sha256(images.tobytes()).hexdigest(), labels.tolist(),
                       meta.sample_ids.tolist()] for images, labels, meta in loader]
try:
    AugmentLoader(sys.argv[1], "photos", output="torch")
except ImportError as exc:
    out["torch"] = str(exc)
print(json.dumps(out))
"""


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from (no venv, caches or built plugins)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(REPO_ROOT / "augsvc", dest / "augsvc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    return dest


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client_only")
    (root / "src").mkdir()
    source = _source_copy(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", str(source)],
                         capture_output=True, text=True, timeout=480, env=env, cwd=root)
    assert pip.returncode == 0, f"pip install augsvc (no extras) failed:\n{pip.stderr}"
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def test_the_numpy_loader_works_with_the_base_dependencies(client_venv, jpeg_folder, tmp_path):
    with running_server({"photos": jpeg_folder}) as server:
        run = _run(client_venv, "python", "-c", ITERATE, server.address,
                   ",".join(SERVER_PARTS), json.dumps(SPEC), cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        got = json.loads(run.stdout)
        with AugmentLoader(server.address, "photos", AugmentSpec.from_dict(SPEC), 4, seed=7,
                           return_meta=True) as loader:
            want = [[hashlib.sha256(images.tobytes()).hexdigest(), labels.tolist(),
                     meta.sample_ids.tolist()] for images, labels, meta in loader]
    assert Path(got["augsvc"]).is_relative_to(client_venv)  # the installed copy, not this tree
    assert got["absent"] == list(SERVER_PARTS)
    assert got["batches"] == want and len(want) == 3
    assert "pip install 'augsvc[torch]'" in got["torch"]


@pytest.mark.parametrize("command", [("serve", "--dataset", "photos={data}", "--port", "0"),
                                     ("stats", "{data}"), ("preview", "{data}"),
                                     ("build-kernels",)])
def test_server_commands_name_the_extra(client_venv, jpeg_folder, tmp_path, command):
    args = [a.format(data=jpeg_folder) for a in command]
    helped = _run(client_venv, "augsvc", args[0], "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "pip install 'augsvc[server]'" in helped.stdout
    ran = _run(client_venv, "augsvc", *args, cwd=tmp_path)
    assert ran.returncode == 2, (ran.stdout, ran.stderr)
    assert "pip install 'augsvc[server]'" in ran.stderr and "Traceback" not in ran.stderr


def test_client_extras_are_declared() -> None:
    """What the venv tests rely on, read from pyproject.toml (fast, no venv)."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for name in ("grpcio-health-checking", "grpcio-reflection", "nvidia-dali", "pillow",
                 "matplotlib", "torch"):
        assert name not in base, name
    server = " ".join(project["optional-dependencies"]["server"])
    assert "grpcio-health-checking" in server and "grpcio-reflection" in server
    assert "torch" in " ".join(project["optional-dependencies"]["torch"])
