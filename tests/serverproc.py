"""Run `augsvc serve` as a real subprocess for tests (loopback, ephemeral port).

    with running_server({"photos": folder}, "--max-streams", "4", workers=2) as server:
        channel = grpc.insecure_channel(server.address)
        ...
        assert server.stop() == 0        # optional: the context stops it anyway

The server runs in its own process group (session), so a test can signal it alone,
and cleanup can kill every process it started, workers included: nothing leaks even
when the parent was SIGKILLed. Its stderr goes to a file (`server.stderr()`) and is
printed when the `with` body raises, so pytest shows it beside the failure.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["SERVING_LINE", "ServerProcess", "child_pids", "connections_per_worker",
           "running_server"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVING_LINE = re.compile(
    r"^augsvc: serving (?P<datasets>\d+) dataset\(s\) on (?P<host>\S+):(?P<port>\d+) "
    r"\(device=(?P<device>\w+), workers=(?P<workers>\d+)"
    r"(, health_port=(?P<health_port>\d+))?(, metrics_port=(?P<metrics_port>\d+))?\)$"
)


def child_pids(pid: int) -> list[int]:
    """Pids of the live direct children of `pid` (from /proc), sorted."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(link[len("socket:["):-1])
    return out


def _tcp_ends() -> dict[str, tuple[int, int]]:
    """inode -> (local port, remote port) of every established TCP socket."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            for row in table.readlines()[1:]:
                cols = row.split()
                if cols[3] == "01":  # ESTABLISHED
                    out[cols[9]] = (int(cols[1].rsplit(":", 1)[1], 16),
                                    int(cols[2].rsplit(":", 1)[1], 16))
    return out


def connections_per_worker(client: int, workers: Sequence[int], port: int) -> list[int]:
    """How many established TCP connections from process `client` to `port` each of the
    processes `workers` holds: the kernel's view, from /proc."""
    ends = _tcp_ends()
    mine = {ends[i][0] for i in _socket_inodes(client) if ends.get(i, (0, 0))[1] == port}
    return [sum(1 for i in _socket_inodes(w) if i in ends and ends[i][0] == port
                and ends[i][1] in mine) for w in workers]


@dataclass
class ServerProcess:
    """A running `augsvc serve` subprocess."""

    proc: subprocess.Popen
    host: str
    port: int
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    health_port: int | None = None  # the health-only port of --health-port
    metrics_port: int | None = None  # the /metrics port of --metrics-port

    @property
    def address(self) -> str:
        """host:port for grpc channels, e.g. "127.0.0.1:41234"."""
        return f"{self.host}:{self.port}"

    def pids(self) -> list[int]:
        """The worker processes' pids (live children of the parent process)."""
        return child_pids(self.proc.pid)

    def connections_from(self, client: int) -> list[int]:
        """`connections_per_worker` of process `client` over `pids()`, in that order."""
        return connections_per_worker(client, self.pids(), self.port)

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Send `sig` to the parent process (or, like a terminal's Ctrl-C, to its group)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig`, wait for the parent to exit; its return code.

        If it is still running after `timeout` s, the whole process group is killed and
        TimeoutError raised (with the server's stderr).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"augsvc serve did not exit within {timeout} s of "
                               f"{signal.Signals(sig).name}; killed it. stderr:\n"
                               f"{self.stderr()}") from None

    def kill(self) -> None:
        """SIGKILL every process of the server's group and reap the parent."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


@contextlib.contextmanager
def running_server(
    datasets: dict[str, Path],
    *extra_args: str,
    workers: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    port: int = 0,
    prefix: Sequence[str] = (),
    command: Sequence[str] = (sys.executable, "-m", "augsvc", "serve"),
) -> Iterator[ServerProcess]:
    """Start `python -m augsvc serve --dataset NAME=PATH ... --port PORT --device cpu
    --workers N *extra_args`, wait for its serving line, yield it; stop it on exit
    (SIGTERM, then SIGKILL of the whole group after 30 s).

    `prefix` runs it through a command that execs the rest in the same process, e.g.
    `("ip", "netns", "exec", NS)` to start it inside a network namespace. `command`
    replaces `python -m augsvc serve` (e.g. with the serve of a container image).
    """
    args = [*prefix, *command]
    for name, path in datasets.items():
        args += ["--dataset", f"{name}={path}"]
    args += ["--port", str(port), "--device", "cpu", "--workers", str(workers), *extra_args]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    with tempfile.NamedTemporaryFile(prefix="augsvc-serve-", suffix=".stderr",
                                     delete=False) as err:
        stderr_path = Path(err.name)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env=full_env, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    server = None
    try:
        server = _wait_until_serving(proc, lines, stderr_path, timeout)
        yield server
    except BaseException:
        if server is not None:
            print(f"--- augsvc serve stderr ---\n{server.stderr()}", file=sys.stderr)
        raise
    finally:
        if server is None:
            server = ServerProcess(proc, "127.0.0.1", 0, stderr_path)
        try:
            if proc.poll() is None:
                with contextlib.suppress(TimeoutError):
                    server.stop(signal.SIGTERM, timeout=30)
        finally:
            server.kill()  # reaps the group: workers that outlived the parent, if any
            if proc.stdout is not None:
                proc.stdout.close()
            with contextlib.suppress(OSError):
                stderr_path.unlink()


def _wait_until_serving(proc: subprocess.Popen, lines: queue.Queue[str | None],
                        stderr_path: Path, timeout: float) -> ServerProcess:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(0.0, min(left, 0.5)))
        except queue.Empty:
            line = ""
        if line is None or (line == "" and proc.poll() is not None and lines.empty()):
            proc.wait(10)
            raise RuntimeError(f"augsvc serve exited with {proc.returncode} before serving; "
                               f"stderr:\n{stderr_path.read_text(errors='replace')}")
        if line:
            seen.append(line)
            match = SERVING_LINE.match(line)
            if match:
                ports = [None if match[name] is None else int(match[name])
                         for name in ("health_port", "metrics_port")]
                return ServerProcess(proc, match["host"], int(match["port"]), stderr_path,
                                     seen, *ports)
        if left <= 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise TimeoutError(f"augsvc serve printed no serving line within {timeout} s; "
                               f"stdout: {seen!r}; stderr:\n"
                               f"{stderr_path.read_text(errors='replace')}")
