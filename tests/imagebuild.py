"""Build and run deploy/Dockerfile with buildah for tests, with no registry to pull from.

    missing = missing_tools()            # [] or what to install / how to run
    b = Buildah(cache_dir())             # its own image storage under ~/.cache/augsvc/deploy
    b.ensure_base(dockerfile_bases(DOCKERFILE))   # debootstrap'd bookworm under the FROM name
    seconds = b.build(clean_context(tmp), "localhost/augsvc:test", log)
    with b.container("localhost/augsvc:test") as ctr:
        argv = [*b.run_command(ctr, volumes=("/data:/data:ro",)), "augsvc", "serve", ...]

The base image is `debootstrap --variant=minbase bookworm`, cleaned like the official
slim image and committed under the exact name the Dockerfile's FROM uses; its root file
system is kept as a tarball in the cache folder and the image (with buildah's layer cache)
in a storage root beside it, so a rerun neither debootstraps nor rebuilds unchanged layers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from serverproc import REPO_ROOT, child_pids

__all__ = ["DOCKERFILE", "Buildah", "cache_dir", "clean_context", "descendants",
           "dockerfile_bases", "dockerfile_instructions", "kill_tree", "missing_tools"]

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# /etc/apt/sources.list.d/debian.sources of the official debian:bookworm-slim
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"buildah": "buildah", "debootstrap": "debootstrap", "git": "git"}  # command: package


def missing_tools() -> list[str]:
    """What keeps this machine from building and running the image; [] when nothing."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (debootstrap and buildah's chroot isolation need it)")
    absent = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if absent:
        missing.append(f"{', '.join(absent)} (`sudo sh scripts/system-deps.sh` or "
                       f"`apt-get install {' '.join(absent)}`)")
    if not (REPO_ROOT / ".git").exists():
        missing.append(f"a git checkout at {REPO_ROOT} (the build context is `git ls-files`)")
    return missing


def cache_dir() -> Path:
    """~/.cache/augsvc/deploy (or under $XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "augsvc" / "deploy"


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every instruction, continuation lines joined."""
    out = []
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if words and not words[0].startswith("#"):
            out.append((words[0].upper(), words[1] if len(words) > 1 else ""))
    return out


def dockerfile_bases(dockerfile: Path) -> set[str]:
    """The fully qualified images the Dockerfile's FROM lines name (stages excluded)."""
    stages, bases = set(), set()
    for instruction, args in dockerfile_instructions(dockerfile):
        words = args.split()
        if instruction != "FROM" or not words:
            continue
        image = next(w for w in words if not w.startswith("--"))
        if len(words) >= 3 and words[-2].upper() == "AS":
            stages.add(words[-1])
        if image not in stages:
            bases.add(_qualified(image))
    return bases


def _qualified(image: str) -> str:
    """docker.io/library/debian:bookworm-slim for debian:bookworm-slim, as docker reads it."""
    first = image.split("/")[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{image}"
    return image


def clean_context(dest: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files (no .venv, no caches) to dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src, dst = REPO_ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet in git
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    out, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        out += children
        todo += children
    return out


class Buildah:
    """buildah with its own storage root (`root/storage`); base tarball under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = ["buildah", "--root", str(root / "storage"),
                       "--runroot", str(root / "run")]

    def __call__(self, *args: str, timeout: float = 600) -> str:
        """Run `buildah ARGS`; its stdout; RuntimeError with its stderr on failure."""
        result = subprocess.run([*self.prefix, *args], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)} exited with {result.returncode}:\n"
                               f"{result.stderr[-4000:]}")
        return result.stdout

    def has_image(self, name: str) -> bool:
        result = subprocess.run([*self.prefix, "inspect", "--type", "image", name],
                                capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        return result.returncode == 0

    def ensure_base(self, names: set[str]) -> None:
        """Commit the debootstrap'd bookworm under every name in `names` that is absent."""
        for name in sorted(n for n in names if not self.has_image(n)):
            if not name.startswith("docker.io/library/debian:bookworm"):
                raise ValueError(f"the Dockerfile's FROM {name} is not a Debian bookworm image "
                                 "this test can make with debootstrap")
            tarball = self._base_tarball()
            ctr = self("from", "--pull=never", "scratch").strip()
            try:
                self("add", ctr, str(tarball), "/")
                self("config", "--env", f"PATH={PATH}", "--cmd", "bash", ctr)
                self("commit", "--quiet", ctr, name)
            finally:
                self("rm", ctr)

    def _base_tarball(self) -> Path:
        """debootstrap --variant=minbase bookworm, cleaned, as a tarball (made once)."""
        tarball = self.root / "debian-bookworm-minbase.tar"
        if tarball.is_file():
            return tarball
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".debootstrap-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
                capture_output=True, text=True, timeout=1200)
            if result.returncode != 0:
                raise RuntimeError(f"debootstrap exited with {result.returncode}:\n"
                                   f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
            (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
            (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
            for junk in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                         "var/lib/apt/lists/*_*", "var/log/*.log", "var/log/apt/*"):
                for path in rootfs.glob(junk):
                    path.unlink()
            partial = Path(tmp) / "base.tar"
            subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial),
                            "."], check=True, timeout=600)
            os.replace(partial, tarball)
        return tarball

    def build(self, context: Path, tag: str, log: Path, secrets: dict[str, Path]) -> float:
        """`buildah bud` deploy/Dockerfile in `context` (output to `log`); its seconds."""
        args = ["bud", "--isolation", "chroot", "--pull=never", "--layers",
                "--format", "docker",  # OCI images drop HEALTHCHECK
                "-f", "deploy/Dockerfile", "-t", tag]
        for name, path in secrets.items():
            args += ["--secret", f"id={name},src={path}"]
        started = time.monotonic()
        with open(log, "wb") as out:
            result = subprocess.run([*self.prefix, *args, "."], cwd=context, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=1500)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            raise RuntimeError(f"buildah bud exited with {result.returncode}:\n{tail}")
        return seconds

    def inspect(self, image: str) -> dict:
        """`buildah inspect --type image`, parsed."""
        return json.loads(self("inspect", "--type", "image", image))

    def image_bytes(self, image: str) -> int:
        """The image's size: its layers, uncompressed."""
        manifest = json.loads(self.inspect(image)["Manifest"])
        return sum(layer["size"] for layer in manifest["layers"])

    @contextlib.contextmanager
    def container(self, image: str) -> Iterator[str]:
        """A working container of `image`, removed on exit."""
        name = f"augsvc-test-{uuid.uuid4().hex[:8]}"
        self("from", "--pull=never", "--name", name, image)
        try:
            yield name
        finally:
            self("rm", name)

    def written(self, ctr: str) -> list[str]:
        """Files the container wrote to its own file system (its overlay upper layer), and
        the mount points `buildah run` made there; not the directories above them."""
        merged = Path(self("mount", ctr).strip())
        try:
            upper = merged.parent / "diff"
            return sorted("/" + str(p.relative_to(upper)) for p in upper.rglob("*")
                          if not p.is_dir() or not any(p.iterdir()))
        finally:
            self("umount", ctr)

    def run_command(self, ctr: str, volumes: tuple[str, ...] = ()) -> list[str]:
        """`buildah run` of the container (chroot isolation, host network), up to `--`."""
        args = [*self.prefix, "run", "--isolation", "chroot", "--network", "host"]
        for volume in volumes:
            args += ["--volume", volume]
        return [*args, ctr, "--"]

    def exec(self, ctr: str, *argv: str) -> subprocess.CompletedProcess:
        """Run argv in the container and wait (stdout and stderr captured)."""
        return subprocess.run([*self.run_command(ctr), *argv], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and everything below it (chroot isolation has no pid namespace)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
