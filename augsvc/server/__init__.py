"""The augsvc gRPC server: configuration, dataset catalog, servicer, workers, and `serve`.

From the outside in: `serve(config)` (`augsvc.server.supervisor`) is what `augsvc serve`
runs: the parent reserves the port (`SO_REUSEPORT`), indexes every dataset once
(`augsvc.server.catalog`), forks the worker processes before any gRPC object exists and
supervises them. Each worker runs an `AugmentServer` (`augsvc.server.app`): the
`augsvc.v1.Augment` servicer (`servicer`, `pipelines`, `scheduler`, `producer`,
`batchcache`; limits in `admission`, `memory`, `watchdog`), health, reflection, TLS and
the token check (`auth`). `ServerConfig` (`config`) holds every
option. `start_server(config)` runs one server in-process, for tests and embedding.
"""

from augsvc.server.app import AugmentServer, start_server
from augsvc.server.catalog import Catalog, DatasetEntry, load_catalog
from augsvc.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from augsvc.server.supervisor import serve

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
