"""The augsvc gRPC server: configuration, dataset catalog, one gRPC server, and `serve`.

Pieces, from the outside in:

* `serve(config)`: what `augsvc serve` runs. The parent process reserves the port with
  an `SO_REUSEPORT` socket (so `port=0` yields ONE ephemeral port for all workers),
  indexes every dataset once (`load_catalog`), then forks `config.workers` worker
  processes before any gRPC object exists; each worker runs an `AugmentServer` on the
  shared port with its own DALI pipelines. The parent supervises them (restarts a
  crashed worker, forwards SIGINT/SIGTERM, exits 0 after a graceful stop); see
  `augsvc._workers`.
* `AugmentServer`: one gRPC server with the `augsvc.v1.Augment` service
  (`augsvc._servicer`), the standard health service (`grpc.health.v1`, statuses for
  "" and "augsvc.v1.Augment") and server reflection; optional TLS / mutual TLS and a
  bearer token (health and reflection stay open for probes). `start_server(config)`
  runs one in-process, for tests and embedding.
* `ServerConfig`: every option of `augsvc serve`, validated.

The parent never imports DALI or touches CUDA: workers are forked, and CUDA does not
survive a fork.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from augsvc import wire
from augsvc._servicer import AugmentServicer, Catalog, DatasetEntry, PipelinePool, TokenInterceptor
from augsvc.dataset import open_dataset
from augsvc.stats import StatsError, load_stats

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "AugmentServer",
    "Catalog",
    "DatasetEntry",
    "ServerConfig",
    "load_catalog",
    "serve",
    "start_server",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEVICES = ("auto", "cpu", "gpu")
STATS_SOURCES = ("dataset", "imagenet")
# Threads beyond --max-streams for unary calls, health checks, reflection and the
# immediate rejection of streams over the limit.
SPARE_THREADS = 16


@dataclass(frozen=True)
class ServerConfig:
    """Every option of `augsvc serve` (see `augsvc serve --help` for each one's meaning)."""

    datasets: Mapping[str, Path]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = "auto"  # "auto": gpu when an NVIDIA GPU is visible, else cpu
    device_id: int = 0
    workers: int = 1
    max_streams: int = 64  # concurrent StreamBatches per worker
    max_batch_size: int = 1024
    prefetch: int = 2  # finished batches queued per stream ahead of the one being sent
    pipeline_cache: int = 4  # idle pipelines kept per worker for reuse
    dali_threads: int | None = None  # per pipeline; None: CPU cores / workers, at most 8
    io_threads: int = 4  # file-reading threads per pipeline
    batch_cache_mb: int = 0  # encoded batches kept per worker for repeated requests; 0: off
    grace: float = 10.0  # seconds running streams get to finish on shutdown
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, a client certificate is required
    token: str | None = field(default=None, repr=False)  # bearer token for augsvc.v1.Augment

    def validate(self) -> ServerConfig:
        """Check every option; return self, or raise ValueError saying what to fix."""
        if not self.datasets:
            raise ValueError("no datasets: give at least one --dataset NAME=PATH")
        for name in self.datasets:
            if not name or not name.isprintable() or "=" in name:
                raise ValueError(f"invalid dataset name {name!r}: use a non-empty printable "
                                 "name without '='")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("workers", "max_streams", "max_batch_size", "prefetch", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dali_threads is not None and self.dali_threads < 1:
            raise ValueError(f"dali_threads must be >= 1, got {self.dali_threads}")
        if min(self.pipeline_cache, self.device_id, self.grace, self.batch_cache_mb) < 0:
            raise ValueError("pipeline_cache, device_id, grace and batch_cache_mb must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.token is not None and (not self.token or not self.token.isprintable()
                                       or self.token != self.token.strip()):
            raise ValueError("the token must be non-empty printable text without surrounding "
                             "whitespace")
        return self

    def resolved_device(self) -> str:
        """"cpu" or "gpu"; "auto" looks for an NVIDIA GPU without initialising CUDA."""
        if self.device != "auto":
            return self.device
        try:
            return "gpu" if os.listdir("/proc/driver/nvidia/gpus") else "cpu"
        except OSError:
            return "cpu"

    def resolved_dali_threads(self) -> int:
        """DALI threads per pipeline."""
        if self.dali_threads is not None:
            return self.dali_threads
        return max(1, min(8, (os.cpu_count() or 1) // self.workers))


def load_catalog(datasets: Mapping[str, str | os.PathLike[str]]) -> Catalog:
    """Index every dataset (`open_dataset`, cached) and load its statistics, once.

    Raises DatasetError / StatsError for a dataset that cannot be served.
    """
    catalog: dict[str, DatasetEntry] = {}
    for name, path in datasets.items():
        index = open_dataset(path)
        stats, missing = {}, {}
        for source in STATS_SOURCES:
            try:
                stats[source] = load_stats(index, source)
            except StatsError as exc:
                missing[source] = str(exc)
        if "imagenet" not in stats:
            raise StatsError(f"dataset {name}: {missing['imagenet']}")
        for path_, reason in index.rejected[:3]:
            log.warning("dataset %s: rejected %s: %s", name, path_, reason)
        log.info("dataset %s: %d images, %d classes, stats: %s%s", name, len(index),
                 len(index.classes), ", ".join(stats),
                 f", {len(index.rejected)} file(s) rejected" if index.rejected else "")
        catalog[name] = DatasetEntry(name=name, index=index, stats=stats, missing_stats=missing)
    return catalog


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class AugmentServer:
    """One gRPC server: the Augment service, health and reflection, on `config.host`.

    `port` overrides `config.port` (0: an ephemeral port, see `.port`). `reuse_port`
    lets several processes bind the same port (the workers of `serve`). `catalog`
    defaults to `load_catalog(config.datasets)`.
    """

    def __init__(
        self,
        config: ServerConfig,
        catalog: Catalog | None = None,
        *,
        port: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config.validate()
        self.catalog = catalog if catalog is not None else load_catalog(config.datasets)
        self.pool = PipelinePool(
            device=config.resolved_device(),
            device_id=config.device_id,
            dali_threads=config.resolved_dali_threads(),
            io_threads=config.io_threads,
            max_idle=config.pipeline_cache,
        )
        self.servicer = AugmentServicer(self.catalog, self.pool, max_streams=config.max_streams,
                                        max_batch_size=config.max_batch_size,
                                        prefetch=config.prefetch,
                                        cache_bytes=config.batch_cache_mb << 20)
        self._executors = (
            futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="augsvc-health"),
            futures.ThreadPoolExecutor(max_workers=config.max_streams + SPARE_THREADS,
                                       thread_name_prefix="augsvc-rpc"),
        )
        self.health = health.HealthServicer(
            experimental_non_blocking=True, experimental_thread_pool=self._executors[0])
        options = [*wire.server_options(), ("grpc.so_reuseport", 1 if reuse_port else 0)]
        interceptors = [TokenInterceptor(config.token)] if config.token else []
        self._server = grpc.server(
            self._executors[1],
            options=options,
            interceptors=interceptors,
        )
        wire.add_augment_servicer(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (wire.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        bind = address(config.host, config.port if port is None else port)
        credentials = _server_credentials(config)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(bind)
            else:
                self.port = self._server.add_secure_port(bind, credentials)
        except RuntimeError as exc:  # grpc raises on a failed bind
            raise OSError(f"cannot listen on {bind}: {exc}") from exc
        if self.port == 0:
            raise OSError(f"cannot listen on {bind}")
        self.address = address(config.host, self.port)
        self._stopping = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> AugmentServer:
        """Start serving; health reports SERVING for "" and augsvc.v1.Augment."""
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(wire.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._server.start()
        log.info("listening on %s (pid %d)", self.address, os.getpid())
        return self

    def begin_shutdown(self) -> None:
        """Health NOT_SERVING and new streams refused (UNAVAILABLE); nothing stops yet."""
        self.health.enter_graceful_shutdown()
        self.servicer.refuse_new_streams()

    def force(self) -> None:
        """Stop waiting for running streams (a second Ctrl-C / SIGTERM)."""
        self.servicer.force_drain()

    def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop: `begin_shutdown`, let running streams finish for up to `grace`
        seconds (default `config.grace`), cancel what is left, stop. Idempotent."""
        if not self._stopping.acquire(blocking=False):
            self._stopped.wait()
            return
        grace = self.config.grace if grace is None else grace
        try:
            self.begin_shutdown()
            left = self.servicer.drain(grace)
            if left:
                log.warning("grace period over: cancelling %d running stream(s)", left)
            self._server.stop(0).wait()
            self.servicer.join_streams(timeout=max(grace, 5.0))
            self.pool.close()
            for executor in self._executors:
                executor.shutdown(wait=False)
        finally:
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `shutdown` has finished; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> AugmentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(grace=0)


def start_server(config: ServerConfig, catalog: Catalog | None = None) -> AugmentServer:
    """An in-process, started `AugmentServer` (no worker processes); `shutdown()` it."""
    return AugmentServer(config, catalog).start()


def serve(config: ServerConfig) -> int:
    """Run the server (parent + worker processes) until SIGINT/SIGTERM; the exit code.

    Prints `augsvc: serving <n> dataset(s) on <host>:<port> (device=<d>, workers=<w>)`
    to stdout once every worker listens. It forks: call it from the main thread of a
    process that has started no other threads, no gRPC server and no CUDA context.
    """
    from augsvc._workers import Supervisor

    return Supervisor(config.validate()).run()
