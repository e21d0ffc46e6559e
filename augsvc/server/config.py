"""`ServerConfig`: every option of `augsvc serve`, validated, and how addresses are written."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from augsvc.server.memory import default_max_memory
from augsvc.server.tokens import read_tokens

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEVICES", "ServerConfig", "address"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEVICES = ("auto", "cpu", "gpu")
MAX_AGE_S = 2_000_000  # ~23 days: gRPC's connection age arguments are 32-bit milliseconds


@dataclass(frozen=True)
class ServerConfig:
    """Every option of `augsvc serve` (see `augsvc serve --help` for each one's meaning)."""

    datasets: Mapping[str, Path]
    stats_files: Mapping[str, Path] = field(default_factory=dict)  # dataset -> its stats file
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
    # Seconds a client connection lives before the server asks the client to reconnect
    # (GOAWAY; gRPC adds +/-10 % jitter), so trainers that only see a load balancer's
    # address spread onto replicas added since. 5 minutes: a scale-up takes effect within
    # minutes, while a reconnect (a TCP and TLS handshake) every 5 minutes costs nothing
    # measurable; 0: never. `AugmentLoader` needs it less: it re-resolves names itself.
    max_connection_age: float = 300.0
    # Seconds the calls running on such a connection get to finish before it is closed
    # (a loader's call is a few batches; what is cut off is fetched again elsewhere).
    max_connection_age_grace: float = 60.0
    health_port: int | None = None  # plaintext grpc.health.v1 only, beside `port`; 0: any
    stall_timeout: float = 60.0  # a stream whose client reads nothing this long is cancelled
    max_memory: int | None = None  # bytes of prefetched batches per worker; None: from the host
    gpus: tuple[int, ...] = ()  # one worker group per GPU (--workers each); (): device_id only
    metrics_port: int | None = None  # Prometheus /metrics (augsvc serve only); 0: any
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, a client certificate is required
    token: str | None = field(default=None, repr=False)  # bearer token for augsvc.v1.Augment
    token_file: Path | None = None  # its tokens instead, read again when it changes
    allow_outside_root: bool = False  # serve links / manifest rows resolving outside a root

    def validate(self) -> ServerConfig:
        """Check every option; return self, or raise ValueError saying what to fix."""
        if not self.datasets:
            raise ValueError("no datasets: give at least one --dataset NAME=PATH")
        for name in self.datasets:
            if not name or not name.isprintable() or "=" in name:
                raise ValueError(f"invalid dataset name {name!r}: use a non-empty printable "
                                 "name without '='")
        unknown = sorted(set(self.stats_files) - set(self.datasets))
        if unknown:
            raise ValueError(f"a statistics file for {unknown[0]!r}, which is not a served "
                             f"dataset")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name, value in (("health port", self.health_port),
                            ("metrics port", self.metrics_port)):
            if value is None:
                continue
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
            if value == self.port != 0:
                raise ValueError(f"the {name} must differ from the port ({self.port})")
        if self.health_port == self.metrics_port and self.health_port:
            raise ValueError(f"the health port and the metrics port must differ "
                             f"({self.health_port})")
        for name in ("workers", "max_streams", "max_batch_size", "prefetch", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dali_threads is not None and self.dali_threads < 1:
            raise ValueError(f"dali_threads must be >= 1, got {self.dali_threads}")
        if min(self.pipeline_cache, self.device_id, self.grace, self.batch_cache_mb,
               self.stall_timeout) < 0:
            raise ValueError("pipeline_cache, device_id, grace, batch_cache_mb and "
                             "stall_timeout must be >= 0")
        for name in ("max_connection_age", "max_connection_age_grace"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_AGE_S:  # also refuses NaN
                raise ValueError(f"{name} must be in [0, {MAX_AGE_S}] seconds (gRPC keeps "
                                 f"it in 32-bit milliseconds), got {value}")
        if self.max_memory is not None and self.max_memory < 1:
            raise ValueError(f"max_memory must be >= 1 byte, got {self.max_memory}")
        if self.gpus:
            if self.device == "cpu":
                raise ValueError("--gpus needs --device gpu (or auto)")
            if len(set(self.gpus)) != len(self.gpus) or min(self.gpus) < 0:
                raise ValueError(f"gpus must be distinct indices >= 0, got {list(self.gpus)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.token is not None and (not self.token or not self.token.isprintable()
                                       or self.token != self.token.strip()):
            raise ValueError("the token must be non-empty printable text without surrounding "
                             "whitespace")
        if self.token_file is not None:
            if self.token is not None:
                raise ValueError("give either a token or a token file, not both")
            read_tokens(self.token_file)
        return self

    @property
    def processes(self) -> int:
        """Worker processes in all: `workers` per GPU group."""
        return self.workers * max(1, len(self.gpus))

    def resolved_max_memory(self) -> int:
        """Bytes of prefetched batches each worker may hold (`augsvc.server.memory`)."""
        if self.max_memory is not None:
            return self.max_memory
        return default_max_memory(self.processes)

    def connection_options(self) -> list[tuple[str, int]]:
        """gRPC server options for the maximum connection age (none when it is 0)."""
        if not self.max_connection_age:
            return []
        return [("grpc.max_connection_age_ms", round(self.max_connection_age * 1000)),
                ("grpc.max_connection_age_grace_ms",
                 round(self.max_connection_age_grace * 1000))]

    def resolved_device(self) -> str:
        """"cpu" or "gpu"; "auto" looks for an NVIDIA GPU without initialising CUDA,
        and means gpu when `gpus` are given."""
        if self.device != "auto":
            return self.device
        if self.gpus:
            return "gpu"
        try:
            return "gpu" if os.listdir("/proc/driver/nvidia/gpus") else "cpu"
        except OSError:
            return "cpu"

    def resolved_dali_threads(self) -> int:
        """DALI threads per pipeline."""
        if self.dali_threads is not None:
            return self.dali_threads
        return max(1, min(8, (os.cpu_count() or 1) // self.processes))


def address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
