"""Prometheus export of `AugmentLoader.stats()` (optional: `pip install 'augsvc[metrics]'`).

    from prometheus_client import start_http_server
    from augsvc.client.metrics import register_loader_metrics

    register_loader_metrics(loader, labels={"rank": str(rank)})
    start_http_server(9400)          # /metrics

The collector reads `loader.stats()` at every scrape (nothing is counted twice and the
hot path never touches prometheus_client). Series, all counters (`_total`):
`augsvc_loader_wait_seconds`, `augsvc_loader_batches`, `augsvc_loader_retries`,
`augsvc_loader_failovers`, `augsvc_loader_abandoned_streams`, `augsvc_loader_reconnects`,
and per `server`: `augsvc_loader_server_batches`, `_images`, `_bytes`, `_busy_seconds`,
`_failures`. Images per second is `rate(augsvc_loader_server_images_total[1m])`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from augsvc.client.loader import AugmentLoader

__all__ = ["LoaderCollector", "register_loader_metrics"]

_TOTALS = (  # (name, LoaderStats field, help)
    ("augsvc_loader_wait_seconds", "wait_s",
     "Time the training loop spent blocked waiting for a batch (data starvation)"),
    ("augsvc_loader_batches", "batches", "Batches yielded to the training loop"),
    ("augsvc_loader_retries", "retries", "Calls that failed or were abandoned, and retried"),
    ("augsvc_loader_failovers", "failovers", "Batches handed back to be fetched again"),
    ("augsvc_loader_abandoned_streams", "abandoned",
     "Streams replaced for a call gRPC never ended, or silence"),
    ("augsvc_loader_reconnects", "reconnects", "Times a failing server answered again"),
)
_PER_SERVER = (  # (name, ServerStats field, help)
    ("augsvc_loader_server_batches", "batches", "Batches received from this server"),
    ("augsvc_loader_server_images", "images", "Images received from this server"),
    ("augsvc_loader_server_bytes", "bytes", "Pixel bytes received from this server"),
    ("augsvc_loader_server_busy_seconds", "seconds",
     "Time at least one call to this server was running"),
    ("augsvc_loader_server_failures", "failures", "Failed or abandoned calls to this server"),
)


class LoaderCollector:
    """A prometheus_client collector over one loader's `stats()`; `labels` are added to
    every series (e.g. the rank)."""

    def __init__(self, loader: AugmentLoader, labels: Mapping[str, str] | None = None) -> None:
        self.loader = loader
        self.labels = dict(labels or {})

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        stats = self.loader.stats()
        names, values = list(self.labels), list(self.labels.values())
        for name, field, doc in _TOTALS:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, getattr(stats, field))
            yield family
        for name, field, doc in _PER_SERVER:
            family = CounterMetricFamily(name, doc, labels=[*names, "server"])
            for address, server in stats.servers.items():
                family.add_metric([*values, address], getattr(server, field))
            yield family


def register_loader_metrics(loader: AugmentLoader, registry: Any = None, *,
                            labels: Mapping[str, str] | None = None) -> LoaderCollector:
    """Register a `LoaderCollector` for `loader` (default: prometheus_client's global
    registry); `registry.unregister(collector)` removes it. ImportError without
    prometheus_client."""
    try:
        from prometheus_client import REGISTRY
    except ImportError as exc:
        raise ImportError("augsvc.client.metrics needs prometheus_client: "
                          "pip install 'augsvc[metrics]'") from exc
    collector = LoaderCollector(loader, labels)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
