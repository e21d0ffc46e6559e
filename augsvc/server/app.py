"""`AugmentServer`: one gRPC server with the Augment service, health and reflection.

The `augsvc.v1.Augment` service (`augsvc.server.servicer`), the standard health service
(`grpc.health.v1`, statuses for "" and "augsvc.v1.Augment") and server reflection, with
optional TLS / mutual TLS and a bearer token (health and reflection stay open for
probes). With `health_port` a second, plaintext gRPC server beside it serves only
`grpc.health.v1` from the same health servicer (so draining shows NOT_SERVING there too):
probes that speak neither TLS nor tokens (Kubernetes' gRPC probes) check a TLS server
through it. `start_server(config)` runs one in-process, for tests and embedding; `augsvc
serve` runs one per worker process (`augsvc.server.supervisor`).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from augsvc import wire
from augsvc.server.admission import Admission, AdmissionInterceptor
from augsvc.server.auth import TokenInterceptor
from augsvc.server.batchcache import BatchCache
from augsvc.server.catalog import Catalog, load_catalog
from augsvc.server.config import ServerConfig, address
from augsvc.server.decoding import DecodeInHandler
from augsvc.server.logs import limit_grpc_logs
from augsvc.server.memory import limit_malloc_arenas
from augsvc.server.metrics import ServerMetrics
from augsvc.server.pipelines import PipelinePool
from augsvc.server.servicer import AugmentServicer
from augsvc.server.tokens import TokenFile

__all__ = ["AugmentServer", "start_server"]

log = logging.getLogger("augsvc.server")

# Threads beyond --max-streams for unary calls, health checks, reflection and the
# refusal of streams over the limit: admitted streams never take them.
SPARE_THREADS = 16
HEALTH_THREADS = 4  # for the health-only server of --health-port
# Calls gRPC core holds until the Python server takes them. Past its default (1000), a
# flood's surplus was cancelled (CANCELLED) instead of refused (RESOURCE_EXHAUSTED).
MAX_PENDING_CALLS = 8192



def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)



class AugmentServer:
    """One gRPC server: the Augment service, health and reflection, on `config.host`.

    `port` and `health_port` override `config.port` and `config.health_port` (0: an
    ephemeral port, see `.port` and `.health_port`, None when there is no health-only
    server). `reuse_port` lets several processes bind the same ports (the workers of
    `serve`); `worker` (index, count) is which of them this one is, sent with every
    stream (`wire.WORKER_KEY`). `catalog` defaults to
    `load_catalog(config.datasets, config.stats_files)`.
    """

    def __init__(
        self,
        config: ServerConfig,
        catalog: Catalog | None = None,
        *,
        port: int | None = None,
        health_port: int | None = None,
        reuse_port: bool = False,
        worker: tuple[int, int] | None = None,
    ) -> None:
        self.config = config.validate()
        limit_grpc_logs()
        limit_malloc_arenas()  # before gRPC's threads: memory a burst frees can go back
        self.catalog = (catalog if catalog is not None
                        else load_catalog(config.datasets, config.stats_files,
                                          allow_outside=config.allow_outside_root))
        cache = BatchCache(config.batch_cache_mb << 20)
        max_memory = config.resolved_max_memory()
        self.metrics = ServerMetrics(self.catalog)
        self.pool = PipelinePool(
            device=config.resolved_device(),
            device_id=config.device_id,
            dali_threads=config.resolved_dali_threads(),
            io_threads=config.io_threads,
            max_idle=config.pipeline_cache,
            max_memory=max_memory,
            depth=config.prefetch,
            cache=cache,
            max_batch_size=config.max_batch_size,
            metrics=self.metrics,
        )
        self.admission = Admission(config.max_streams, self.metrics)
        self.servicer = AugmentServicer(self.catalog, self.pool, self.admission,
                                        max_batch_size=config.max_batch_size, cache=cache,
                                        stall_timeout=config.stall_timeout,
                                        metrics=self.metrics, worker=worker)
        log.debug("memory for prefetched batches: %.0f MiB (--max-memory)", max_memory / 2**20)
        self._executors = [
            futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="augsvc-health"),
            futures.ThreadPoolExecutor(max_workers=config.max_streams + SPARE_THREADS,
                                       thread_name_prefix="augsvc-rpc"),
        ]
        self.health = health.HealthServicer(
            experimental_non_blocking=True, experimental_thread_pool=self._executors[0])
        reuse = ("grpc.so_reuseport", 1 if reuse_port else 0)
        options = [*wire.server_options(), reuse, *config.connection_options(),
                   ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                   ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS)]
        # The first interceptor is the outermost: it sees every call first and wraps the
        # handler every later one returns. DecodeInHandler first, so every handler decodes
        # its own requests (grpcio leaks on undecodable ones); the token next, so calls
        # without it never reach admission (which holds a slot for each call it lets
        # through until its handler starts: an unauthenticated flood would fill
        # --max-streams for PENDING_TTL); admission last, on authenticated calls alone.
        interceptors: list[grpc.ServerInterceptor] = [DecodeInHandler()]
        if config.token_file is not None:
            interceptors.append(TokenInterceptor(TokenFile(config.token_file).tokens))
        elif config.token:
            fixed = frozenset([config.token.encode()])
            interceptors.append(TokenInterceptor(lambda: fixed))
        interceptors.append(AdmissionInterceptor(self.admission, wire.STREAM_BATCHES_METHOD))
        self._server = grpc.server(
            self._executors[1],
            options=options,
            interceptors=interceptors,
        )
        wire.add_augment_servicer(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (wire.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = self._bind(self._server, config.port if port is None else port,
                               _server_credentials(config))
        self.address = address(config.host, self.port)
        self._servers = [self._server]
        self.health_port: int | None = None
        if health_port is None:
            health_port = config.health_port
        if health_port is not None:
            self._executors.append(futures.ThreadPoolExecutor(
                max_workers=HEALTH_THREADS, thread_name_prefix="augsvc-health-port"))
            health_server = grpc.server(self._executors[-1], options=[reuse],
                                        interceptors=[DecodeInHandler()])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_port = self._bind(health_server, health_port, None)
            self._servers.append(health_server)
        self._stopping = threading.Lock()
        self._stopped = threading.Event()

    def _bind(self, server: grpc.Server, port: int,
              credentials: grpc.ServerCredentials | None) -> int:
        bind = address(self.config.host, port)
        try:
            if credentials is None:
                bound = server.add_insecure_port(bind)
            else:
                bound = server.add_secure_port(bind, credentials)
        except RuntimeError as exc:  # grpc raises on a failed bind
            raise OSError(f"cannot listen on {bind}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot listen on {bind}")
        return bound

    def start(self) -> AugmentServer:
        """Start serving; health reports SERVING for "" and augsvc.v1.Augment."""
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(wire.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        for server in self._servers:
            server.start()
        extra = "" if self.health_port is None else f", health only on port {self.health_port}"
        log.info("listening on %s%s (pid %d)", self.address, extra, os.getpid())
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
            for server in self._servers:
                server.stop(0).wait()
            self.servicer.join_streams(timeout=max(grace, 5.0))
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
