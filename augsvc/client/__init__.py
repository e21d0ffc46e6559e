"""The augsvc client: `AugmentLoader`, what a training loop iterates (numpy, grpcio, protobuf only).

`loader` is the public surface; `state` its epoch arithmetic and resume state; `fetcher`,
`streams`, `schedule` and `servers` the stream threads, supervisor, reordering, back-off
and failover behind it; `discovery` names to replica addresses; `tlsprobe` what a closed
connection meant; `stats` what `loader.stats()` returns, `metrics` its optional
Prometheus export; `torch_output` the optional torch tensors, `staging` and `transfer`
their way onto a CUDA device; `memory` the malloc tuning. The client never imports DALI,
PIL or matplotlib (an import-linter contract holds this). `quiet`, imported first, keeps
gRPC core's log lines off stderr unless GRPC_VERBOSITY asks for them.
"""

from augsvc.client import quiet  # noqa: F401  (first: before grpc is imported)
from augsvc.client.errors import AugsvcError
from augsvc.client.loader import AugmentLoader
from augsvc.client.meta import BatchMeta
from augsvc.client.state import num_batches
from augsvc.client.stats import LoaderStats, ServerStats
from augsvc.core.types import DroppedSample

__all__ = ["AugmentLoader", "AugsvcError", "BatchMeta", "DroppedSample", "LoaderStats",
           "ServerStats", "num_batches"]
