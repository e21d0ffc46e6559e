"""`serve`: what `augsvc serve` runs. One port, N forked workers, a supervising parent.

Parent (`Supervisor.run`):

1. reserve the port (and the health-only port, if any): a socket bound with
   `SO_REUSEPORT` (not listening) holds it, so `port=0` gives one ephemeral port that
   every worker binds too;
2. index the datasets once (`load_catalog`; the children inherit the index);
3. block SIGINT/SIGTERM (they are then consumed synchronously with `sigtimedwait`, no
   asynchronous handler) and fork the workers before any gRPC object exists;
4. print the serving line once every worker listens (with `--metrics-port`, the
   metrics process is forked first: `augsvc.server.exporter`);
5. supervise: a worker that crashes is replaced (a crash loop stops the server); the
   first SIGINT/SIGTERM is forwarded to every worker as SIGTERM (graceful: health
   NOT_SERVING, new streams refused, running streams drain for `grace` s), a second
   one as another SIGTERM (stop now), a third kills them; exit 0 once every worker
   has exited cleanly.

Worker: ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the
parent is in charge), gets SIGTERM when the parent dies (Linux `PR_SET_PDEATHSIG`),
is pinned to its GPU with `--gpus` (`augsvc.server.gpus`), runs an `AugmentServer` on
the shared port(s) with its own DALI pipelines, and names itself (slot / processes) in
each stream's initial metadata (`wire.WORKER_KEY`). DALI is imported, and CUDA touched, only
in workers: the parent never loads them (CUDA does not survive a fork).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait

from augsvc.server.app import AugmentServer
from augsvc.server.catalog import Catalog, load_catalog
from augsvc.server.config import ServerConfig, address
from augsvc.server.exporter import MetricsExporter
from augsvc.server.gpus import pin_to_gpu, served_gpus, worker_gpu
from augsvc.server.metrics import SupervisorMetrics

__all__ = ["Supervisor", "reserve_port", "serve"]

log = logging.getLogger("augsvc.server")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTUP_TIMEOUT = 120.0  # seconds for every worker to listen
STOP_MARGIN = 15.0  # seconds past the grace period before workers are killed
CRASH_WINDOW, MAX_CRASHES = 60.0, 5  # more crashes than this within the window: give up
_POLL = 0.2


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[tuple[socket.socket, int]]:
    """A bound (not listening) SO_REUSEPORT socket holding host:port, and the port number.

    With port 0 the kernel picks a free port. A port another process listens on is
    an OSError (probed first without SO_REUSEPORT, which would let us share it).
    """
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if port:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise OSError(f"cannot listen on {address(host, port)}: {why}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@dataclass(frozen=True)
class _Ports:
    """The ports every worker binds, and the parent's sockets that hold them."""

    sockets: tuple[socket.socket, ...]
    port: int
    health_port: int | None


@dataclass
class _Worker:
    slot: int
    process: multiprocessing.process.BaseProcess
    conn: Connection | None  # ("ready", port) or ("error", message); None once closed
    ready: bool = False
    error: str | None = None


class Supervisor:
    """The parent process of `serve` (module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        # one memory budget for every worker, measured before any of them allocates
        self.config = replace(config, max_memory=config.resolved_max_memory())
        self.device = config.resolved_device()
        self._ctx = multiprocessing.get_context("fork")
        self._workers: list[_Worker] = []
        self._crashes: list[float] = []
        self._exporter: MetricsExporter | None = None
        self._metrics = SupervisorMetrics()

    def run(self) -> int:
        config = self.config
        with contextlib.ExitStack() as stack:  # fail fast: reserve the ports before indexing
            sock, port = stack.enter_context(reserve_port(config.host, config.port))
            sockets, health_port = (sock,), None
            if config.health_port is not None:
                health_sock, health_port = stack.enter_context(
                    reserve_port(config.host, config.health_port))
                sockets += (health_sock,)
            if config.metrics_port is not None:
                gpus = served_gpus(config.gpus, config.device_id) if self.device == "gpu" else []
                self._exporter = MetricsExporter(config.host, config.metrics_port, gpus)
                stack.callback(self._exporter.close)
                self._metrics = SupervisorMetrics()  # in the multiprocess directory now
            catalog = load_catalog(config.datasets, config.stats_files,
                                   allow_outside=config.allow_outside_root)
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                return self._supervise(catalog, _Ports(sockets, port, health_port))
            finally:
                self._kill_all()
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    # --- the loop

    def _supervise(self, catalog: Catalog, ports: _Ports) -> int:
        config = self.config
        exporter = self._exporter
        if exporter is not None:  # first: it serves while the workers start and stop
            exporter.start(self._ctx, self._prepare_child(ports.sockets))
        for slot in range(config.processes):
            self._spawn(slot, catalog, ports)
        serving = False
        stopping = 0  # signals received
        deadline = time.monotonic() + STARTUP_TIMEOUT
        clean = True
        while self._workers:
            for signum in self._pending_signals():
                stopping += 1
                clean &= self._on_signal(signum, stopping)
                deadline = time.monotonic() + config.grace + STOP_MARGIN
            objects = [w.conn for w in self._workers if w.conn is not None]
            objects += [w.process.sentinel for w in self._workers]
            metrics = None if exporter is None or exporter.process is None else (
                exporter.process.sentinel)
            if metrics is not None:
                objects.append(metrics)
            ready = set(wait(objects, timeout=_POLL))
            if metrics in ready:
                exporter.exited(self._ctx, self._prepare_child(ports.sockets))
            for w in list(self._workers):
                if w.conn is not None and w.conn in ready:
                    self._read_message(w)
                if w.process.sentinel in ready:
                    self._read_message(w)
                    if w.conn is not None:
                        w.conn.close()
                    w.process.join()
                    self._workers.remove(w)
                    self._metrics.workers.set(len(self._workers))
                    if exporter is not None:
                        exporter.process_dead(w.process.pid)
                    code = w.process.exitcode
                    if stopping:
                        clean &= code == 0
                        log.debug("worker %d (pid %d) exited with %s", w.slot, w.process.pid,
                                  _describe(code))
                    elif not w.ready or w.error:
                        log.error("worker %d failed to start: %s", w.slot,
                                  w.error or f"it exited with {_describe(code)}")
                        return self._abort()
                    elif code == 0:
                        log.info("worker %d (pid %d) stopped", w.slot, w.process.pid)
                    elif not self._restart(w, code, catalog, ports):
                        return self._abort()
            if not serving and self._workers and all(w.ready for w in self._workers):
                serving = True
                extra = "" if ports.health_port is None else f", health_port={ports.health_port}"
                if exporter is not None:
                    extra += f", metrics_port={exporter.port}"
                print(f"augsvc: serving {len(catalog)} dataset(s) on "
                      f"{address(config.host, ports.port)} (device={self.device}, "
                      f"workers={config.processes}{extra})", flush=True)
            if (stopping or not serving) and time.monotonic() > deadline:
                what = "stop" if stopping else "start"
                log.error("workers did not %s in time; killing them", what)
                return self._abort()
        if stopping:
            log.info("stopped")
        return 0 if clean else 1

    def _on_signal(self, signum: int, count: int) -> bool:
        name = signal.Signals(signum).name
        if count == 1:
            log.info("%s: stopping; running streams get %g s to finish", name, self.config.grace)
            self._signal_all(signal.SIGTERM)
            return True
        if count == 2:
            log.warning("%s again: cancelling running streams", name)
            self._signal_all(signal.SIGTERM)
            return True
        log.warning("%s a third time: killing the workers", name)
        self._signal_all(signal.SIGKILL)
        return False

    @staticmethod
    def _pending_signals() -> Iterator[int]:
        while (info := signal.sigtimedwait(SIGNALS, 0)) is not None:
            yield info.si_signo

    @staticmethod
    def _read_message(w: _Worker) -> None:
        """Take the worker's messages; close the pipe at its end (the worker closes it)."""
        if w.conn is None:
            return
        try:
            while w.conn.poll():
                kind, value = w.conn.recv()
                if kind == "ready":
                    w.ready = True
                else:
                    w.error = value
        except (EOFError, OSError):
            w.conn.close()
            w.conn = None

    def _restart(self, w: _Worker, code: int | None, catalog: Catalog, ports: _Ports) -> bool:
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
        if len(self._crashes) > MAX_CRASHES:
            log.error("worker %d (pid %d) exited with %s; %d crashes within %g s, giving up",
                      w.slot, w.process.pid, _describe(code), len(self._crashes), CRASH_WINDOW)
            return False
        log.error("worker %d (pid %d) exited with %s; starting a new one", w.slot,
                  w.process.pid, _describe(code))
        self._metrics.restarts.inc()
        self._spawn(w.slot, catalog, ports)
        return True

    def _abort(self) -> int:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_MARGIN
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()
        return 1

    # --- processes

    def _prepare_child(self, sockets: tuple[socket.socket, ...]) -> Callable[[], None]:
        """What a forked child runs first: `_child_setup` with the parent's sockets."""
        return functools.partial(_child_setup, os.getpid(), sockets)

    def _spawn(self, slot: int, catalog: Catalog, ports: _Ports) -> None:
        recv, send = self._ctx.Pipe(duplex=False)
        sockets = ports.sockets if self._exporter is None else (
            *ports.sockets, self._exporter.socket)
        process = self._ctx.Process(
            target=_worker_main, name=f"augsvc-worker-{slot}",
            args=(self.config, slot, catalog, ports, send, self._prepare_child(sockets)),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        process.start()  # SIGINT/SIGTERM are blocked here, and stay blocked in the child
        send.close()
        self._workers.append(_Worker(slot, process, recv))
        self._metrics.workers.set(len(self._workers))

    def _signal_all(self, signum: int) -> None:
        for w in self._workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signum)

    def _kill_all(self) -> None:
        for w in self._workers:
            if w.process.is_alive():
                log.error("killing worker %d (pid %d)", w.slot, w.process.pid)
                w.process.kill()
            w.process.join()
        self._workers.clear()


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------
# the worker


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when the parent dies (Linux), so workers never outlive it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _child_setup(parent: int, sockets: tuple[socket.socket, ...]) -> None:
    """In a forked child: close the parent's sockets (it holds the ports), ignore SIGINT
    (the parent is in charge), and die with the parent."""
    for sock in sockets:
        sock.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)


def _worker_main(config: ServerConfig, slot: int, catalog: Catalog, ports: _Ports,
                 conn: Connection, prepare: Callable[[], None]) -> None:
    """A worker process: serve on the shared port(s) until SIGTERM, then drain and exit."""
    prepare()
    code = 0
    try:
        gpu = worker_gpu(slot, config.workers, config.gpus)
        if gpu is not None:  # before DALI or CUDA start
            visible = pin_to_gpu(gpu)
            config = replace(config, device_id=0)
            log.info("worker %d (pid %d) runs on GPU %d (CUDA_VISIBLE_DEVICES=%s)", slot,
                     os.getpid(), gpu, visible)
        server = _start_worker_server(config, slot, catalog, ports, conn)
        if server is None:
            code = 1
        else:
            while signal.sigtimedwait([signal.SIGTERM], 3600) is None:
                pass
            stopper = threading.Thread(target=server.shutdown, name="augsvc-shutdown")
            stopper.start()
            while stopper.is_alive():
                if signal.sigtimedwait([signal.SIGTERM], _POLL) is not None:
                    server.force()
            stopper.join()
    except Exception:
        log.exception("worker failed")
        code = 1
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: DALI and gRPC threads need none


def _start_worker_server(config: ServerConfig, slot: int, catalog: Catalog, ports: _Ports,
                         conn: Connection) -> AugmentServer | None:
    """Import DALI (so the first request does not pay for it), bind, start, report."""
    try:
        import nvidia.dali  # noqa: F401

        server = AugmentServer(config, catalog, port=ports.port, health_port=ports.health_port,
                               reuse_port=True, worker=(slot, config.processes)).start()
    except ImportError as exc:
        conn.send(("error", f"cannot import DALI ({exc}); install augsvc[server]"))
        return None
    except Exception as exc:
        log.debug("worker startup failed", exc_info=True)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return None
    conn.send(("ready", server.port))
    conn.close()
    return server


def serve(config: ServerConfig) -> int:
    """Run the server (parent + worker processes) until SIGINT/SIGTERM; the exit code.

    Prints `augsvc: serving <n> dataset(s) on <host>:<port> (device=<d>, workers=<w>)`
    (`..., workers=<w>, health_port=<p>, metrics_port=<q>)` with a health-only port and
    a metrics port, each part only with its option) to stdout once every
    worker listens. It forks: call it from the main thread of a
    process that has started no other threads, no gRPC server and no CUDA context.
    The parent never imports DALI or touches CUDA: CUDA does not survive a fork.
    """
    return Supervisor(config.validate()).run()
