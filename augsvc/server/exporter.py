"""`--metrics-port`: `GET /metrics`, served by a small process that the parent forks.

`MetricsExporter` makes the directory of prometheus_client's multiprocess mode, a fresh
one for each run (its rule: the directory must be empty at start, or an earlier run's
counts are summed in), and points `PROMETHEUS_MULTIPROC_DIR` at it before any series
exists in any process (`augsvc.server.metrics`); it binds the port at once, so a port
in use fails the start and port 0 is known for the serving line. Its process answers
`/metrics` with the sum of every process's files (`MultiProcessCollector`) and, on a
GPU server, the GPUs' memory (`augsvc.server.nvml`). The parent tells it which workers
have exited (`mark_process_dead`: their gauges leave the sums), and removes the
directory when the server stops.

Why a process and not a thread of the parent: the parent forks a new worker whenever one
dies, and a fork copies the locks other threads hold (stdio's, for one), so the parent
stays single-threaded. Like the parent, it never imports DALI or starts CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, MetricsHandler, multiprocess, values

from augsvc.server.config import address
from augsvc.server.nvml import GpuMemoryCollector

__all__ = ["NAME", "PATH", "MetricsExporter"]

log = logging.getLogger("augsvc.server")

ENV = "PROMETHEUS_MULTIPROC_DIR"
PATH = "/metrics"
NAME = "augsvc-metrics"  # the process's name (Linux: ps, top, /proc/PID/comm)
EXIT_WINDOW, MAX_EXITS = 60.0, 3  # this many exits of the metrics process within the window


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {address(host, port)} (--metrics-port): "
                      f"{exc.strerror or exc}") from None
    return sock


class MetricsExporter:
    """The multiprocess directory, the metrics port and the process serving it (module
    doc). `gpus`: CUDA_VISIBLE_DEVICES entries whose memory to report (none on CPU)."""

    def __init__(self, host: str, port: int, gpus: Sequence[str] = ()) -> None:
        self.socket = _listen(host, port)
        self.port: int = self.socket.getsockname()[1]
        self.directory = tempfile.mkdtemp(prefix="augsvc-metrics-")
        self._saved = os.environ.get(ENV)
        os.environ[ENV] = self.directory
        values.ValueClass = values.get_value_class()  # whoever imported prometheus_client first
        self._gpus = tuple(gpus)
        self.process: multiprocessing.process.BaseProcess | None = None
        self._exits: list[float] = []

    def start(self, ctx: multiprocessing.context.BaseContext,
              prepare: Callable[[], None]) -> None:
        """Fork the serving process; it runs `prepare()` first (close the parent's other
        sockets, die with the parent)."""
        self.process = ctx.Process(target=_serve, name=NAME,
                                   args=(self.socket, self.directory, self._gpus, prepare))
        self.process.start()

    def exited(self, ctx: multiprocessing.context.BaseContext,
               prepare: Callable[[], None]) -> None:
        """The serving process died: start another on the same port, unless it died
        `MAX_EXITS` times within `EXIT_WINDOW` s (then /metrics stays off: the workers
        matter more)."""
        assert self.process is not None
        self.process.join()
        code, now = self.process.exitcode, time.monotonic()
        self._exits = [t for t in self._exits if now - t < EXIT_WINDOW] + [now]
        if len(self._exits) >= MAX_EXITS:
            log.error("the metrics process exited with code %s, %d times within %g s; "
                      "/metrics is off", code, len(self._exits), EXIT_WINDOW)
            self.process = None
            return
        log.error("the metrics process exited with code %s; starting a new one", code)
        self.start(ctx, prepare)

    def process_dead(self, pid: int) -> None:
        """A worker exited: its gauges leave the sums (its counters stay)."""
        multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        """Stop the serving process, close the port, remove the directory."""
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._saved
        values.ValueClass = values.get_value_class()


class _Handler(MetricsHandler):
    def do_GET(self) -> None:
        if urlparse(self.path).path != PATH:
            self.send_error(404, f"metrics are at {PATH}")
            return
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


def _serve(sock: socket.socket, directory: str, gpus: tuple[str, ...],
           prepare: Callable[[], None]) -> None:
    """The metrics process: serve until SIGTERM (or the parent's death)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])  # the parent blocks it
    prepare()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(15, NAME.encode())  # PR_SET_NAME
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    if gpus:
        registry.register(GpuMemoryCollector(gpus))
    server = _Server(sock.getsockname()[:2], _Handler.factory(registry), bind_and_activate=False)
    with contextlib.suppress(OSError):
        server.socket.close()
    server.socket = sock
    server.serve_forever()
