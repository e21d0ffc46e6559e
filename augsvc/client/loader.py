"""`AugmentLoader`: what a training loop iterates to get augmented batches from augsvc servers.

    with AugmentLoader(["aug-0:50051", "aug-1:50051"], "imagenet", batch_size=256,
                       seed=0, rank=rank, world_size=world, output="torch",
                       device="cuda", normalize=True) as loader:
        for epoch in range(epochs):
            for images, labels in loader:   # each pass is the next epoch (loader.epoch)
                ...

* **Epochs.** Each pass over the loader runs the next epoch, so two passes never repeat
  the same augmentations. The first pass runs the constructor's `epoch`; `set_epoch(e)`
  before a pass makes that pass run epoch `e` (calling it before every pass, as with
  torch's DistributedSampler, gives the same data as counting); `loader.epoch` is the
  epoch running (of the batch yielded last). `loader.epochs(count)` runs `count` epochs
  (None: without end) in one pass, reading ahead across the boundaries; the pass after
  it runs the epoch after its last.
* **Resume.** `state_dict()` names dataset, spec, seed, sharding, tail, shuffle, balance,
  the epoch and the next batch to yield; after `load_state_dict()` the next pass
  resumes there: mid-epoch with the rest of the epoch, after an epoch's last batch with
  the next epoch, as the saved run would have gone on (unless `set_epoch` names the
  finished epoch again: its pass is then empty). A state of another run: ValueError.
* **Evaluation.** `shuffle=False` deals the dataset in its own order; `tail="keep"`
  keeps the partial last batch. With both, the ranks together see every sample exactly
  once, in dataset order: rank r gets batches k with (k x world_size + r) x batch_size
  < num_samples, the last one possibly short, so ranks may differ by one batch. (torch's
  DistributedSampler instead pads every rank to the same length by repeating samples;
  `tail="pad"` does that here.) Shuffling is an argument of the loader, not of the spec:
  the spec says what happens to each image, the loader which images come in which order.
* **Fan-out.** `streams_per_server` streams per server address fetch disjoint groups of
  batches; a reorder buffer restores the order, with at most `prefetch` batches
  requested or held ahead (bounded memory). On a server of several worker processes
  the streams are evened out over its workers (`augsvc.client.placement`).
* **Failures.** A stream failing with a retryable status (UNAVAILABLE, DEADLINE_EXCEEDED,
  CANCELLED not by us, a reset connection, a broken frame sequence) hands its batches
  back to any other stream (the same bytes, by determinism). A stream whose call has
  ended while gRPC's iterator does not return (a grpcio bug: scripts/grpc_stuck_call.py),
  or that has received nothing for `timeout` s, is abandoned: its batches go back to
  the queue and a new stream on a new connection replaces it. No server is given up
  for a number of failures: each stream backs off (0.1 s doubling to 2 s, jitter) and
  asks its server something small before it takes work again. Only when no server has
  answered for `reconnect_timeout` s (default 300: a pod restart or a rolling update
  takes well under that, while a dead cluster still fails the job within minutes) does
  the pass raise `AugsvcError`; the wait is logged once. Statuses no retry can fix, and
  a TLS mismatch (a plaintext loader at a TLS server, a missing or refused client
  certificate: the error says which), raise `AugsvcError` at once (`.code`, `.details`,
  `.server`).
* **Discovery.** A name (`host:port`, `dns:///host:port`) is resolved to every address
  it has (`resolve`, default the system resolver, IPv4 when it has any), each address
  getting its own streams; names are looked up again every `resolve_interval` s and
  soon after a failure: a replica that joins gets work, one that leaves finishes its
  call and hands back the rest (docs/discovery.md: a Kubernetes headless Service).
* **Stats.** `loader.stats()` (a `LoaderStats`): the time the training loop waited for
  data, per-server batches, bytes and images/s, retries, failovers and reconnects;
  `augsvc.client.metrics` exports it to Prometheus when prometheus_client is there.
* **Output.** numpy: uint8 (or the spec's dtype) arrays and int64 labels; torch:
  tensors, pinned when CUDA is available (the wire stays uint8). With `device="cuda"`
  each batch is assembled in one of a few reused pinned buffers, copied once on the
  loader's own CUDA stream and normalized there in one kernel; batch k+1's copy starts
  before batch k is yielded, so it runs during the training step, and the tensors come
  ready for the caller's current stream (it waits on an event; the host does not).
  `return_meta=True` adds a `BatchMeta`; `last_meta`/`last_dropped`
  describe the batch yielded last. A corrupt image's row holds a deterministic stand-in
  (`meta.substituted`; spec `corrupt="substitute"`, the default) or, with
  `corrupt="drop"`, is left out (a shorter batch, `meta.dropped`).
* **Ctrl-C.** A KeyboardInterrupt leaving a `for` loop over the loader (or a `with
  loader:` block) cancels its streams and joins their threads on the way out; an
  iterator held elsewhere keeps them until it is closed or the loader is.
* **PyTorch DataLoader.** `torch_dataset()` wraps the loader for `DataLoader(ds,
  batch_size=None)`. With `num_workers=0` (recommended: the loader is already parallel)
  it is the loader itself. With workers, each worker fetches every num_workers-th batch
  of a copy of the loader, taken when the workers start: non-persistent workers start
  from the loader as it is at each pass, so call `loader.set_epoch(epoch)` before each
  pass; `persistent_workers=True` copies advance one epoch per pass by themselves (and
  do not see a later `set_epoch`). The loader's own `epoch`/`state_dict()` do not follow
  workers, and `device` must be None there (use `pin_memory`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from augsvc import wire
from augsvc.client import memory
from augsvc.client.discovery import Resolve, resolve_addresses
from augsvc.client.errors import AugsvcError
from augsvc.client.fetcher import Fetcher, default_readahead
from augsvc.client.meta import BatchMeta
from augsvc.client.options import (
    check_choice,
    check_flags,
    check_spec,
    check_targets,
    check_timeout,
    check_token,
)
from augsvc.client.output import Output
from augsvc.client.schedule import PassOrder
from augsvc.client.servers import ChannelCache, ServerPool, pem_bytes
from augsvc.client.state import STATE_FORMAT, U32, U64, Position, check_int, check_state
from augsvc.client.stats import LoaderStats, StatsRecorder
from augsvc.client.torch_output import torch_dataset_class
from augsvc.core.sampling import TAILS, Sharding, epoch_length
from augsvc.core.spec import AugmentSpec
from augsvc.core.types import DroppedSample
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

__all__ = ["AugmentLoader"]


class AugmentLoader:
    """Augmented batches of one rank's share of a dataset, streamed from augsvc servers.

    Iterate it once per epoch (each pass runs the next epoch), or `epochs(count)` for
    several in one pass; see the module documentation for epochs, resume, evaluation,
    ordering, failures and PyTorch.

    Args:
        servers: "host:port", "dns:///host:port" or a list of them (no port: 50051); a
            name stands for every address it resolves to.
        dataset: the dataset's name on the servers (`augsvc serve --dataset NAME=PATH`).
        spec: what to do to each image (default `AugmentSpec()`, the training preset).
        batch_size: samples per batch (the last one may be shorter with tail="keep").
        seed: the run's seed; with the epoch it fixes every order and augmentation.
        rank: this process's rank in [0, world_size).
        world_size: how many ranks share each epoch.
        epoch: the epoch of the first pass (later passes count on from it).
        shuffle: shuffle the epoch order (False: dataset order, for evaluation).
        tail: the last incomplete round: "drop_last", "pad" (wrap around) or "keep".
        balance: up-sample every class to the largest one's count.
        output: "numpy" (arrays) or "torch" (tensors; needs `augsvc[torch]`).
        device: with output="torch", the device to move batches to (e.g. "cuda").
        normalize: float32 (x - mean) / std with the dataset statistics, on `device`
            (for "cuda" on the loader's stream, overlapping the training step).
        return_meta: yield (images, labels, meta) with a `BatchMeta`.
        streams_per_server: parallel streams (connections) to each server.
        prefetch: batches requested or held ahead at most (default: enough for the streams).
        batches_per_request: batches one StreamBatches call asks for.
        token: sent as "authorization: Bearer <token>".
        root_certificates: PEM bytes, text or a path: turns TLS on.
        client_certificate: (chain, key) PEM for a mutual-TLS server.
        timeout: seconds any wait on a server may last (calls, silent streams).
        reconnect_timeout: seconds without any server answering before the pass fails.
        resolve: (host, port) -> addresses of a name (default: the system resolver).
        resolve_interval: seconds between two lookups of the names.
        tune_malloc: tune glibc malloc for large batches on the first pass.
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
        shuffle: bool = True,
        tail: str = "drop_last",
        balance: bool = False,
        output: str = "numpy",
        device: Any = None,
        normalize: bool = False,
        return_meta: bool = False,
        streams_per_server: int = 2,
        prefetch: int | None = None,
        batches_per_request: int = 2,
        token: str | None = None,
        root_certificates: bytes | str | Path | None = None,
        client_certificate: tuple[bytes | str | Path, bytes | str | Path] | None = None,
        timeout: float = 60.0,
        reconnect_timeout: float = 300.0,
        resolve: Resolve = resolve_addresses,
        resolve_interval: float = 30.0,
        tune_malloc: bool = True,
    ) -> None:
        targets = check_targets(servers)
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
        spec = check_spec(spec)
        check_int("batch_size", batch_size, 1, U32)
        check_int("seed", seed, 0, U64)
        check_int("epoch", epoch, 0, U64)
        check_int("world_size", world_size, 1, U32)
        check_int("rank", rank, 0, world_size - 1)
        check_int("streams_per_server", streams_per_server, 1, 1024)
        check_int("batches_per_request", batches_per_request, 1, 1 << 16)
        if prefetch is not None:
            check_int("prefetch", prefetch, 1, 1 << 20)
        check_choice("tail", tail, TAILS)
        check_flags(shuffle=shuffle, balance=balance, normalize=normalize,
                    return_meta=return_meta, tune_malloc=tune_malloc)
        if normalize and spec.normalize:
            raise ValueError("normalize=True would normalize twice: the spec already has "
                             "normalize=True (the server normalizes)")
        check_token(token)
        if client_certificate is not None and root_certificates is None:
            raise ValueError("client_certificate (mutual TLS) needs root_certificates (TLS)")
        self._output = Output(output, device, normalize, spec.layout)

        self.dataset, self.spec, self.batch_size, self.seed = dataset, spec, batch_size, seed
        self.rank, self.world_size, self.tail, self.balance = rank, world_size, tail, balance
        self.shuffle, self.output, self.normalize = shuffle, output, normalize
        self.return_meta = return_meta
        self.streams_per_server = streams_per_server
        self.batches_per_request = batches_per_request
        self.tune_malloc = tune_malloc
        client_pem = (None if client_certificate is None
                      else (pem_bytes(client_certificate[0]), pem_bytes(client_certificate[1])))
        self.pool = ServerPool(targets, pem_bytes(root_certificates), token,
                               check_timeout(timeout), reconnect_timeout, client_pem, resolve,
                               resolve_interval)
        self.prefetch = prefetch  # None: (batches_per_request + 1) per stream
        self._stats = StatsRecorder()
        self._spec_proto = spec_to_proto(spec)
        self._position = Position(epoch)
        self._info: pb.DatasetInfo | None = None
        self._fetcher: Fetcher | None = None
        self._channels: ChannelCache | None = None  # kept across passes, closed by close()
        self._lock = threading.Lock()
        self.last_meta: BatchMeta | None = None

    # -- epochs, length, state ------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch running: of the batch yielded last, or the one chosen for the next pass."""
        return self._position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass run `epoch` (a loaded resume point in it is kept)."""
        self._position.choose(epoch)

    def dataset_info(self) -> pb.DatasetInfo:
        """The dataset's GetDataset answer (fetched once, statistics of `spec.stats`)."""
        if self._info is None:
            self._info = self.pool.get_dataset(self.dataset, self.spec.stats)
        return self._info

    def _sharding(self) -> Sharding:
        info = self.dataset_info()
        counts = list(info.class_counts) if self.balance else None
        return Sharding(epoch_length(info.num_samples, counts), self.batch_size,
                        self.world_size, self.tail)

    def __len__(self) -> int:
        """This rank's number of batches per epoch."""
        try:
            return self._sharding().num_batches(self.rank)
        except ValueError as exc:
            raise AugsvcError(f"dataset {self.dataset!r}: {exc}",
                              code=grpc.StatusCode.INVALID_ARGUMENT) from exc

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: enough to resume the run at the next batch exactly."""
        epoch, next_batch = self._position.state()
        return {
            "format": STATE_FORMAT,
            "dataset": self.dataset,
            "spec": self.spec.to_dict(),
            "seed": self.seed,
            "epoch": epoch,
            "next_batch": next_batch,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "tail": self.tail,
            "shuffle": self.shuffle,
            "balance": self.balance,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass resume where `state` stood (ValueError if it is another run's)."""
        self._position.load(*check_state(state, self.state_dict()))

    # -- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """This rank's batches of the next epoch (see the module documentation)."""
        return self.epochs(1)

    def epochs(self, count: int | None = None) -> Iterator[tuple[Any, ...]]:
        """`count` epochs back to back from the next one (None: without end).

        Like one pass per epoch, but the streams read ahead across each epoch boundary
        instead of draining at the end of every epoch. The first epoch starts at the
        loaded resume point, if any; `epoch` and `state_dict()` follow the batch yielded
        last.
        """
        if count is not None:
            check_int("count", count, 1, U64)
        n = len(self)
        start = self._position.begin(n)
        return self._run(PassOrder(self._position.epoch, n, start, count), track=True,
                         pin=None)

    def _worker_pass(self, worker: int, num_workers: int) -> Iterator[tuple[Any, ...]]:
        """Every num_workers-th batch of the next epoch from `worker` on (a torch DataLoader
        worker's share, from its copy of the loader)."""
        if self._output.device is not None:
            raise ValueError("device must be None in DataLoader workers; use pin_memory=True")
        n = len(self)
        start = self._position.begin(n)
        epoch = self._position.epoch
        order = [(epoch, b) for b in range(start, n)[worker::num_workers]]
        return self._run(order, track=False, pin=False)

    def _run(self, order: Sequence[tuple[int, int]], *, track: bool,
             pin: bool | None) -> Iterator[Any]:
        if self.tune_malloc:
            memory.tune_malloc()
        with self._lock:
            if self._fetcher is not None:
                self._fetcher.close()
            fetcher = self._fetcher = self._make_fetcher(order, pin)
            batches = self._output.batches(fetcher.get, fetcher.schedule.ready, len(order),
                                           self.dataset_info)  # the pass's buffers, now
        return self._generate(fetcher, batches, order, track)

    def _generate(self, fetcher: Fetcher, batches: Iterator[Any],
                  order: Sequence[tuple[int, int]], track: bool) -> Iterator[Any]:
        try:
            for position, (images, labels, meta) in enumerate(batches):
                if track:
                    self._position.advance(*order[position])
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
            tail=self.tail, balance=self.balance, shuffle=self.shuffle,
        )
        # a device pass's staging ring: the read-ahead the targets as given start with
        # (more replicas found later make spare buffers, dropped again once free)
        ring = self.prefetch or default_readahead(
            self.streams_per_server * len(self.pool.targets), self.batches_per_request)
        allocate, finish = self._output.parts(pin, ring)
        if self._channels is None or self._channels.pid != os.getpid():
            self._channels = ChannelCache(self.pool)
        sharding = self._sharding()
        first: dict[str, tuple[str, str, str]] = {}  # the pass's first statistics seen
        return Fetcher(
            self.pool, request, order,
            channels=self._channels,
            streams_per_server=self.streams_per_server,
            group_size=self.batches_per_request,
            readahead=self.prefetch,
            allocate=allocate,
            finish=finish,
            check=lambda header, k, server: self._check(header, k, server, sharding, first),
            stats=self._stats,
        )

    def _check(self, header: pb.BatchHeader, expected: int, server: str,
               sharding: Sharding, first: dict[str, tuple[str, str, str]]) -> None:
        """A header must answer what was asked (raises WireError: the stream is retried),
        with the statistics of the pass's first batch when the spec uses them (raises
        AugsvcError: no retry mends a server's other statistics file)."""
        spec = self.spec
        h, w = spec.size
        shape = tuple(header.shape)
        want = (h, w, 3) if spec.layout == "NHWC" else (3, h, w)
        start, stop = sharding.span(expected, self.rank)
        length = stop - start  # batch_size, but the epoch's last may be short (tail "keep")
        problems = []
        if header.batch_index != expected:
            problems.append(f"batch {header.batch_index} where {expected} was due")
        if header.dtype != spec.dtype or header.layout != spec.layout or shape[1:] != want:
            problems.append(f"{header.layout} {header.dtype} {shape} for a spec of "
                            f"{spec.layout} {spec.dtype} {want}")
        if shape[0] + len(header.dropped) != length:
            problems.append(f"{shape[0]} samples + {len(header.dropped)} dropped != "
                            f"{length}, the length of batch {expected}")
        if problems:
            raise wire.WireError(f"{server}: " + "; ".join(problems))
        if spec.pca or spec.normalize:
            source, digest, where = first.setdefault(
                "stats", (header.stats_source, header.stats_digest, server))
            if (source, digest) != (header.stats_source, header.stats_digest):
                raise AugsvcError(
                    f"the servers' statistics of dataset {self.dataset!r} differ, so their "
                    f"batches would too ({'fancy PCA' if spec.pca else 'normalize'} uses "
                    f"them): {where} made batches with {source!r} statistics ({digest}), "
                    f"{server} with {header.stats_source!r} ({header.stats_digest}). Give "
                    f"every server the same statistics file (augsvc stats PATH, or "
                    f"--dataset NAME=PATH,stats=FILE)",
                    code=grpc.StatusCode.FAILED_PRECONDITION, server=server)

    # -- PyTorch --------------------------------------------------------------------

    def torch_dataset(self) -> Any:
        """A `torch.utils.data.IterableDataset` over this loader (DataLoader batch_size=None)."""
        return torch_dataset_class()(self)

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Cancel the streams of a pass in progress, join their threads, close connections,
        let the staging buffers go."""
        with self._lock:
            fetcher, self._fetcher = self._fetcher, None
            channels, self._channels = self._channels, None
        if fetcher is not None:
            fetcher.close()
        if channels is not None:
            channels.close()
        self._output.release()

    def __enter__(self) -> AugmentLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fetcher=None, _channels=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"AugmentLoader({list(self.pool.targets)!r}, {self.dataset!r}, "
                f"batch_size={self.batch_size}, seed={self.seed}, epoch={self.epoch}, "
                f"rank={self.rank}, world_size={self.world_size}, output={self.output!r})")
