"""`AugmentLoader`: what a training loop iterates to get augmented batches from augsvc servers.

    with AugmentLoader(["aug-0:50051", "aug-1:50051"], "imagenet", batch_size=256,
                       seed=0, rank=rank, world_size=world, output="torch",
                       device="cuda", normalize=True) as loader:
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch)
            for images, labels in loader:
                ...

        # or every epoch in one pass, read-ahead running across the epoch boundaries:
        loader.set_epoch(start_epoch)
        for images, labels in loader.epochs(epochs - start_epoch):
            ...  # loader.epoch is the epoch of the batch just yielded

* **Iteration.** Each pass yields this rank's batches of the current epoch, in order
  (`len(loader)` of them; the arithmetic of `augsvc.core.sampling.EpochPlan`);
  `loader.epochs(count)` yields `count` epochs (None: without end) in one pass, with no
  stall at the epoch boundaries. Batches come as
  `(images, labels)`; with `return_meta=True`, `(images, labels, meta)` where `meta` is a
  `BatchMeta` (batch number, sample ids, draw ids, dropped samples). `loader.last_meta`
  always holds the meta of the batch yielded last, and `loader.last_dropped` its dropped
  samples (corrupt images the server left out; that batch is then shorter).
* **Fan-out.** `streams_per_server` streams per server, each on its own connection;
  they fetch disjoint groups of batches; a reorder buffer restores the order, and at most
  `prefetch` batches are requested or held ahead of the consumer (bounded memory).
* **Output.** `output="numpy"`: uint8 (or the spec's dtype) arrays, int64 labels.
  `output="torch"`: tensors, pinned when CUDA is available; `device="cuda"` moves them
  to that GPU (non_blocking) and `normalize=True` normalizes there, as float32, with the
  mean/std of the statistics the spec names (`spec.stats`, from GetDataset); the wire
  stays uint8. Chunks are copied straight into the output buffer.
* **Resume.** `state_dict()` names dataset, spec, seed, epoch, sharding and the next batch
  to yield; `load_state_dict()` makes the next pass start there (only for the same
  dataset, spec, seed, batch size, rank, world size, tail and balance: else ValueError).
* **Failures.** A stream that fails with a retryable status (UNAVAILABLE,
  DEADLINE_EXCEEDED, CANCELLED not by us, a reset connection, a broken frame sequence)
  hands its unfinished batches back; any stream of any server fetches them again — the
  same bytes, by determinism. A stream whose call has ended while gRPC's iterator does
  not return (a grpcio bug: scripts/grpc_stuck_call.py), or that has received nothing
  for `timeout` s, is abandoned: its batches go back to the queue and a new stream on a
  new connection replaces it. No server is given up for a number of failures: each
  stream backs off (0.1 s doubling to 2 s, with jitter) and waits for its connection
  before it takes work again. Only when no server has answered for `reconnect_timeout`
  s (default 300: a pod restart or a rolling update takes well under that, while a
  dead cluster still fails the job within minutes) does the pass raise `AugsvcError`;
  the wait is logged once. Statuses no retry can fix (INVALID_ARGUMENT,
  NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
  FAILED_PRECONDITION, OUT_OF_RANGE), and a TLS mismatch (a plaintext loader at a TLS
  server, a missing or refused client certificate: the error says which), raise
  `AugsvcError` at once, with `.code` (a `grpc.StatusCode`), `.details` (the server's
  message) and `.server`.
* **Discovery.** Each of `servers` is `host:port`, `host` (port 50051) or
  `dns:///host:port`; a name is resolved to every address it has (`resolve(host,
  port)`, default the system resolver, IPv4 when it has any), and each address gets
  `streams_per_server` streams. Names are looked up again every `resolve_interval` s
  and soon after a failure: a replica that joins gets work, one that leaves finishes
  its call and hands back the rest (docs/discovery.md: a Kubernetes headless Service).
* **Stats.** `loader.stats()` is a `LoaderStats`: the time the training loop waited for
  data, per-server batches, bytes and images/s, retries, failovers and reconnects
  (`augsvc.client.metrics` exports it to Prometheus when prometheus_client is there).
* **Security.** `token` is sent as `authorization: Bearer <token>`; `root_certificates`
  (PEM bytes, text or a path) turns TLS on; `client_certificate=(chain, key)` adds the
  client certificate a mutual-TLS server (`--tls-client-ca`) requires.
* **Memory.** `tune_malloc=True` (the default) sets glibc's malloc thresholds for this
  process on the first pass so received chunks and batches reuse heap memory instead of
  page-faulting it in again (`augsvc.client.memory`); `False` leaves malloc alone.
* **Timeouts.** `timeout` (s) bounds every wait on a server: a unary call's deadline, the
  silence after which a stream is abandoned, and `timeout x (1 + batches)` for the
  deadline of a StreamBatches call.
* **PyTorch.** `loader.torch_dataset()` is a `torch.utils.data.IterableDataset` for
  `DataLoader(ds, batch_size=None)`. With `num_workers=0` (recommended: the loader is
  already parallel) it shares the loader's cursor; with workers, each worker fetches every
  num_workers-th batch so the DataLoader's round robin keeps the order, but the loader's
  own `state_dict()` does not follow them and `device` must be None (use `pin_memory`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from augsvc import wire
from augsvc.client import memory
from augsvc.client.discovery import Resolve, resolve_addresses
from augsvc.client.errors import AugsvcError
from augsvc.client.fetcher import Fetcher
from augsvc.client.meta import BatchMeta, batch_meta
from augsvc.client.schedule import PassOrder
from augsvc.client.servers import ChannelCache, ServerPool, pem_bytes
from augsvc.client.state import STATE_FORMAT, U32, U64, check_int, check_state, num_batches
from augsvc.client.stats import LoaderStats, StatsRecorder
from augsvc.client.torch_output import (
    torch_allocator,
    torch_dataset_class,
    torch_device,
    torch_finisher,
)
from augsvc.core.sampling import TAILS
from augsvc.core.spec import AugmentSpec, SpecError
from augsvc.core.types import DroppedSample
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

__all__ = ["AugmentLoader"]

OUTPUTS = ("numpy", "torch")


class AugmentLoader:
    """Augmented batches of one rank's share of a dataset, streamed from augsvc servers.

    See the module documentation for iteration, ordering, resume and failure handling.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        dataset: str,
        spec: AugmentSpec | None = None,
        batch_size: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        epoch: int = 0,
        streams_per_server: int = 2,
        tail: str = "drop_last",
        balance: bool = False,
        output: str = "numpy",
        device: Any = None,
        normalize: bool = False,
        return_meta: bool = False,
        token: str | None = None,
        root_certificates: bytes | str | Path | None = None,
        client_certificate: tuple[bytes | str | Path, bytes | str | Path] | None = None,
        timeout: float = 60.0,
        reconnect_timeout: float = 300.0,
        resolve: Resolve = resolve_addresses,
        resolve_interval: float = 30.0,
        prefetch: int | None = None,
        batches_per_request: int = 2,
        tune_malloc: bool = True,
    ) -> None:
        targets = (servers,) if isinstance(servers, str) else tuple(servers)
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"servers must be 'host:port' or a non-empty list of them, "
                             f"got {servers!r}")
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
        spec = AugmentSpec() if spec is None else spec
        if not isinstance(spec, AugmentSpec):
            raise TypeError(f"spec must be an AugmentSpec, got {type(spec).__name__}")
        try:
            self._spec_proto = spec_to_proto(spec)
        except SpecError as exc:  # what the server would answer, without the round trip
            raise AugsvcError(str(exc), code=grpc.StatusCode.INVALID_ARGUMENT,
                              details=str(exc)) from exc
        check_int("batch_size", batch_size, 1, U32)
        check_int("seed", seed, 0, U64)
        check_int("epoch", epoch, 0, U64)
        check_int("world_size", world_size, 1, U32)
        check_int("rank", rank, 0, world_size - 1)
        check_int("streams_per_server", streams_per_server, 1, 1024)
        check_int("batches_per_request", batches_per_request, 1, 1 << 16)
        if prefetch is not None:
            check_int("prefetch", prefetch, 1, 1 << 20)
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
        for name, value in (("balance", balance), ("normalize", normalize),
                            ("return_meta", return_meta), ("tune_malloc", tune_malloc)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if normalize and spec.normalize:
            raise ValueError("normalize=True would normalize twice: the spec already has "
                             "normalize=True (the server normalizes)")
        if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if token is not None and not (isinstance(token, str) and token):
            raise ValueError("token must be a non-empty string or None")
        self._device = None
        if device is not None:
            if output != "torch":
                raise ValueError("device needs output='torch'")
            self._device = torch_device(device)

        self.dataset, self.spec, self.batch_size, self.seed = dataset, spec, batch_size, seed
        self.rank, self.world_size, self.tail, self.balance = rank, world_size, tail, balance
        self.output, self.normalize, self.return_meta = output, normalize, return_meta
        self.streams_per_server = streams_per_server
        self.batches_per_request = batches_per_request
        self.tune_malloc = tune_malloc
        if client_certificate is not None and root_certificates is None:
            raise ValueError("client_certificate (mutual TLS) needs root_certificates (TLS)")
        client_pem = (None if client_certificate is None
                      else (pem_bytes(client_certificate[0]), pem_bytes(client_certificate[1])))
        self.pool = ServerPool(targets, pem_bytes(root_certificates), token, float(timeout),
                               reconnect_timeout, client_pem, resolve, resolve_interval)
        self.prefetch = prefetch  # None: (batches_per_request + 1) per stream
        self._stats = StatsRecorder()
        self._epoch = epoch
        self._cursor = 0  # the next batch to yield in this epoch
        self._resume: int | None = None  # where the next pass starts, after load_state_dict
        self._info: pb.DatasetInfo | None = None
        self._fetcher: Fetcher | None = None
        self._channels: ChannelCache | None = None  # kept across passes, closed by close()
        self._lock = threading.Lock()
        self._scale_shift: dict[Any, Any] = {}
        self.last_meta: BatchMeta | None = None

    # -- epochs, length, state ------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass (a pending resume point is kept for its epoch)."""
        check_int("epoch", epoch, 0, U64)
        if epoch != self._epoch:
            self._epoch, self._cursor, self._resume = epoch, 0, None

    def dataset_info(self) -> pb.DatasetInfo:
        """The dataset's GetDataset answer (fetched once, statistics of `spec.stats`)."""
        if self._info is None:
            self._info = self.pool.get_dataset(self.dataset, self.spec.stats)
        return self._info

    def __len__(self) -> int:
        """This rank's number of batches per epoch."""
        info = self.dataset_info()
        counts = None
        if self.balance:
            counts = list(info.class_counts)
        try:
            return num_batches(info.num_samples, self.batch_size, self.world_size,
                               self.tail, counts)
        except ValueError as exc:
            raise AugsvcError(f"dataset {self.dataset!r}: {exc}",
                              code=grpc.StatusCode.INVALID_ARGUMENT) from exc

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: enough to resume the epoch at the next batch exactly."""
        return {
            "format": STATE_FORMAT,
            "dataset": self.dataset,
            "spec": self.spec.to_dict(),
            "seed": self.seed,
            "epoch": self._epoch,
            "next_batch": self._cursor if self._resume is None else self._resume,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "tail": self.tail,
            "balance": self.balance,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass resume where `state` stood (ValueError if it is another run's)."""
        epoch, next_batch = check_state(state, self.state_dict())
        self._epoch, self._cursor, self._resume = epoch, next_batch, next_batch

    # -- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """This rank's batches of the epoch, from batch 0 or the loaded resume point."""
        return self.epochs(1)

    def epochs(self, count: int | None = None) -> Iterator[tuple[Any, ...]]:
        """`count` epochs back to back from the current one (None: without end).

        Like iterating the loader once per epoch with `set_epoch`, but the streams
        read ahead across each epoch boundary instead of draining at the end of every
        epoch. The first epoch starts at the loaded resume point, if any; `epoch` and
        `state_dict()` follow the batch yielded last.
        """
        if count is not None:
            check_int("count", count, 1, U64 - self._epoch + 1)
        start, n = self._start()
        self._cursor = start
        return self._run(PassOrder(self._epoch, n, start, count), track=True, pin=None)

    def _start(self) -> tuple[int, int]:
        """(the first batch of the next pass, batches per epoch); uses up a resume point."""
        n = len(self)
        start = 0 if self._resume is None else self._resume
        self._resume = None
        if start > n:
            raise ValueError(f"resume point batch {start} is past the epoch's {n} batches")
        return start, n

    def _shard(self, worker: int, num_workers: int) -> Iterator[tuple[Any, ...]]:
        """Every num_workers-th batch from `worker` on (a torch DataLoader worker's share)."""
        if self._device is not None:
            raise ValueError("device must be None in DataLoader workers; use pin_memory=True")
        start, n = self._start()
        order = [(self._epoch, b) for b in range(start, n)[worker::num_workers]]
        return self._run(order, track=False, pin=False)

    def _run(self, order: Sequence[tuple[int, int]], *, track: bool,
             pin: bool | None) -> Iterator[Any]:
        if self.tune_malloc:
            memory.tune_malloc()
        with self._lock:
            if self._fetcher is not None:
                self._fetcher.close()
            fetcher = self._fetcher = self._make_fetcher(order, pin)
        return self._generate(fetcher, order, track)

    def _generate(self, fetcher: Fetcher, order: Sequence[tuple[int, int]],
                  track: bool) -> Iterator[Any]:
        try:
            for position in range(len(order)):
                images, labels, meta = fetcher.get(position)
                images, labels = self._deliver(images, labels)
                if track:
                    epoch, index = order[position]
                    self._epoch, self._cursor = epoch, index + 1
                self.last_meta = meta
                yield (images, labels, meta) if self.return_meta else (images, labels)
        finally:
            fetcher.close()
            with self._lock:
                if self._fetcher is fetcher:
                    self._fetcher = None

    def stats(self) -> LoaderStats:
        """Counters over this loader's lifetime: the trainer's wait for data, per-server
        throughput, retries, failovers, reconnects (see `augsvc.client.stats`)."""
        return self._stats.snapshot()

    @property
    def last_dropped(self) -> tuple[DroppedSample, ...]:
        """The samples left out of the batch yielded last."""
        return self.last_meta.dropped if self.last_meta is not None else ()

    def _make_fetcher(self, order: Sequence[tuple[int, int]], pin: bool | None) -> Fetcher:
        request = pb.StreamBatchesRequest(
            dataset=self.dataset, spec=self._spec_proto, seed=self.seed,
            rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
            tail=self.tail, balance=self.balance,
        )
        allocate = None
        if self.output == "torch":
            import torch

            if pin is None:
                pin = bool(torch.cuda.is_available())
            allocate = torch_allocator(pin)
        if self._channels is None or self._channels.pid != os.getpid():
            self._channels = ChannelCache(self.pool)
        return Fetcher(
            self.pool, request, order,
            channels=self._channels,
            streams_per_server=self.streams_per_server,
            group_size=self.batches_per_request,
            readahead=self.prefetch,
            allocate=allocate,
            finish=self._finish if self.output == "numpy" else torch_finisher(bool(pin)),
            check=self._check,
            stats=self._stats,
        )

    def _check(self, header: pb.BatchHeader, expected: int, server: str) -> None:
        """A header must answer what was asked (raises WireError: the stream is retried)."""
        spec = self.spec
        h, w = spec.size
        shape = tuple(header.shape)
        want = (h, w, 3) if spec.layout == "NHWC" else (3, h, w)
        problems = []
        if header.batch_index != expected:
            problems.append(f"batch {header.batch_index} where {expected} was due")
        if header.dtype != spec.dtype or header.layout != spec.layout or shape[1:] != want:
            problems.append(f"{header.layout} {header.dtype} {shape} for a spec of "
                            f"{spec.layout} {spec.dtype} {want}")
        if shape[0] + len(header.dropped) != self.batch_size:
            problems.append(f"{shape[0]} samples + {len(header.dropped)} dropped != "
                            f"batch_size {self.batch_size}")
        if problems:
            raise wire.WireError(f"{server}: " + "; ".join(problems))

    @staticmethod
    def _finish(batch: wire.AssembledBatch) -> tuple[Any, Any, BatchMeta]:
        return batch.array, batch.labels, batch_meta(batch)

    def _deliver(self, images: Any, labels: Any) -> tuple[Any, Any]:
        """Move to the device and normalize (in the consumer's thread, on its CUDA stream)."""
        if self._device is not None:
            images = images.to(self._device, non_blocking=True)
            labels = labels.to(self._device, non_blocking=True)
        if self.normalize:
            scale, shift = self._normalizer(images)
            if self.output == "numpy":
                images = images.astype(np.float32) * scale - shift
            else:
                images = images.float().mul_(scale).sub_(shift)
        return images, labels

    def _normalizer(self, images: Any) -> tuple[Any, Any]:
        """(1 / (255 std), mean / std) shaped for the layout; on the images' device."""
        key = images.device if self.output == "torch" else None
        if key not in self._scale_shift:
            stats = self.dataset_info().stats
            mean = np.asarray(stats.mean, dtype=np.float64)
            std = np.asarray(stats.std, dtype=np.float64)
            if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
                raise AugsvcError(f"dataset {self.dataset!r}: GetDataset gave no usable "
                                  f"mean/std for normalize=True (source {stats.source!r})")
            shape = (3,) if self.spec.layout == "NHWC" else (3, 1, 1)
            scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(shape)
            shift = (mean / std).astype(np.float32).reshape(shape)
            if key is not None:
                import torch

                scale, shift = torch.from_numpy(scale).to(key), torch.from_numpy(shift).to(key)
            self._scale_shift[key] = (scale, shift)
        return self._scale_shift[key]

    # -- PyTorch --------------------------------------------------------------------

    def torch_dataset(self) -> Any:
        """A `torch.utils.data.IterableDataset` over this loader (DataLoader batch_size=None)."""
        return torch_dataset_class()(self)

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Cancel the streams of a pass in progress, join their threads, close connections."""
        with self._lock:
            fetcher, self._fetcher = self._fetcher, None
            channels, self._channels = self._channels, None
        if fetcher is not None:
            fetcher.close()
        if channels is not None:
            channels.close()

    def __enter__(self) -> AugmentLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fetcher=None, _channels=None, _lock=None, _scale_shift={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"AugmentLoader({list(self.pool.targets)!r}, {self.dataset!r}, "
                f"batch_size={self.batch_size}, seed={self.seed}, epoch={self._epoch}, "
                f"rank={self.rank}, world_size={self.world_size}, output={self.output!r})")
