"""Conversions between augsvc's domain objects and the `augsvc.v1` protobuf messages.

* `spec_to_proto` / `spec_from_proto`: `AugmentSpec` <-> `pb.AugmentSpec`. Every proto
  field has presence; an unset field takes the dataclass default, and the result is
  validated (`SpecError` naming the field). `spec_to_proto` sets every field, so the
  server applies exactly the client's values even if its defaults differ.
* `StreamRequest`: the validated content of a `StreamBatchesRequest`, with the proto3
  zero values read as documented in the .proto (empty tail = drop_last, unset
  shuffle = true, ...).
* `dataset_summary`, `dataset_info`, `stats_to_proto`, `stats_from_proto`,
  `select_stats_source`: dataset descriptions. `stats_to_proto` takes any object with
  the attributes of `augsvc.core.stats.DatasetStats` (`mean` (3,), `std` (3,), `cov` (3, 3),
  `eigvals` (3,), `eigvecs` (3, 3) with eigenvectors as columns, `num_images`,
  `num_pixels`, `source` = free-text provenance) plus the source kind ("dataset" or
  "imagenet"), which the stats object does not carry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from augsvc.core.sampling import TAILS
from augsvc.core.spec import STATS_CHOICES, STATS_SOURCES, AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.core.text import clip
from augsvc.wire._proto import augment_pb2 as pb

__all__ = [
    "RequestError",
    "StreamRequest",
    "dataset_info",
    "dataset_summary",
    "select_stats_source",
    "spec_from_proto",
    "spec_to_proto",
    "stats_from_proto",
    "stats_to_proto",
]

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(AugmentSpec))
_SPEC_PROTO_FIELDS = pb.AugmentSpec.DESCRIPTOR.fields_by_name


def _kind(name: str) -> str:
    """How an AugmentSpec field travels: "Range", "Size" or "scalar"."""
    message = _SPEC_PROTO_FIELDS[name].message_type
    return message.name if message is not None else "scalar"


_SPEC_KINDS = {name: _kind(name) for name in _SPEC_FIELDS}


# ---------------------------------------------------------------------------
# AugmentSpec


def spec_to_proto(spec: AugmentSpec) -> pb.AugmentSpec:
    """Every field of a (validated) spec, explicitly set."""
    spec.validate()
    msg = pb.AugmentSpec()
    for name, kind in _SPEC_KINDS.items():
        value = getattr(spec, name)
        if kind == "Range":
            getattr(msg, name).CopyFrom(pb.Range(lo=value[0], hi=value[1]))
        elif kind == "Size":
            msg.size.CopyFrom(pb.Size(height=value[0], width=value[1]))
        else:
            setattr(msg, name, value)
    return msg


def spec_from_proto(msg: pb.AugmentSpec | None) -> AugmentSpec:
    """The validated spec; unset fields (or no message at all) take the defaults."""
    if msg is None:
        return AugmentSpec()
    values: dict[str, Any] = {}
    for name, kind in _SPEC_KINDS.items():
        if not msg.HasField(name):
            continue
        value = getattr(msg, name)
        if kind == "Range":
            values[name] = (value.lo, value.hi)
        elif kind == "Size":
            values[name] = (value.height, value.width)
        else:
            values[name] = value
    return AugmentSpec(**values).validate()


# ---------------------------------------------------------------------------
# StreamBatches requests


class RequestError(ValueError):
    """An invalid StreamBatchesRequest; `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"StreamBatchesRequest.{field_name}: {message}")
        self.field = field_name


_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


@dataclass(frozen=True, kw_only=True)
class StreamRequest:
    """What a StreamBatches call asks for (see `StreamBatchesRequest` in the .proto)."""

    dataset: str
    spec: AugmentSpec = dataclasses.field(default_factory=AugmentSpec)
    seed: int
    epoch: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    batches: tuple[int, ...] = ()  # this rank's batch numbers, in order; () = all
    tail: str = "drop_last"
    balance: bool = False
    shuffle: bool = True
    chunk_bytes: int = 0  # 0 = the server's default

    def validate(self) -> StreamRequest:
        """Check every field; return self, or raise RequestError / SpecError."""
        if not isinstance(self.dataset, str) or not self.dataset:
            raise RequestError("dataset", "a dataset name is required")
        if not isinstance(self.spec, AugmentSpec):
            raise RequestError("spec", f"expected an AugmentSpec, got {type(self.spec).__name__}")
        self.spec.validate()
        for name, high in (("seed", _U64), ("epoch", _U64), ("batch_size", _U32),
                           ("rank", _U32), ("world_size", _U32), ("chunk_bytes", _U32)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high):
                raise RequestError(name, f"expected an integer in [0, {high}], got {value!r}")
        if self.batch_size < 1:
            raise RequestError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.world_size < 1:
            raise RequestError("world_size", f"must be >= 1, got {self.world_size}")
        if self.rank >= self.world_size:
            raise RequestError("rank", f"need rank < world_size, got rank={self.rank}, "
                               f"world_size={self.world_size}")
        bad = [b for b in self.batches
               if not (isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= _U32)]
        if bad:
            raise RequestError("batches", f"expected batch numbers >= 0, got {bad[0]!r}")
        if self.tail not in TAILS:
            raise RequestError("tail", f"expected one of {', '.join(TAILS)}, got {clip(self.tail)}")
        for name in ("balance", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(name, f"expected true or false, got {getattr(self, name)!r}")
        return self

    def batch_key(self) -> tuple:
        """Everything of the request that determines the content of each batch (all but
        which batches, and the chunking), for keying caches."""
        return (self.dataset, self.spec, self.seed, self.epoch, self.rank, self.world_size,
                self.batch_size, self.tail, self.balance, self.shuffle)

    def to_proto(self) -> pb.StreamBatchesRequest:
        """The validated request as a message (every field written out)."""
        self.validate()
        return pb.StreamBatchesRequest(
            dataset=self.dataset,
            spec=spec_to_proto(self.spec),
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            batches=list(self.batches),
            tail=self.tail,
            balance=self.balance,
            chunk_bytes=self.chunk_bytes,
            shuffle=self.shuffle,
        )

    @classmethod
    def from_proto(cls, msg: pb.StreamBatchesRequest) -> StreamRequest:
        """Read a request: empty tail = drop_last, world_size 0 = 1, no spec = defaults,
        unset shuffle = true."""
        return cls(
            dataset=msg.dataset,
            spec=spec_from_proto(msg.spec if msg.HasField("spec") else None),
            seed=msg.seed,
            epoch=msg.epoch,
            rank=msg.rank,
            world_size=msg.world_size or 1,
            batch_size=msg.batch_size,
            batches=tuple(msg.batches),
            tail=msg.tail or "drop_last",
            balance=msg.balance,
            shuffle=msg.shuffle if msg.HasField("shuffle") else True,
            chunk_bytes=msg.chunk_bytes,
        ).validate()


# ---------------------------------------------------------------------------
# datasets and statistics

_STATS_SHAPES = {"mean": (3,), "std": (3,), "cov": (3, 3), "eigvals": (3,), "eigvecs": (3, 3)}


def stats_to_proto(stats: Any, source: str) -> pb.DatasetStats:
    """`stats` (a DatasetStats or look-alike) as a message; matrices row-major.

    `source` is which statistics these are ("dataset" or "imagenet"); the object's own
    free-text `source` goes to `description`.
    """
    if source not in STATS_SOURCES:
        raise ValueError(f"source must be one of {', '.join(STATS_SOURCES)}, got {source!r}")
    arrays = {}
    for name, shape in _STATS_SHAPES.items():
        value = np.asarray(getattr(stats, name), dtype=np.float64)
        if value.shape != shape:
            raise ValueError(f"stats.{name} must have shape {shape}, got {value.shape}")
        arrays[name] = value.reshape(-1).tolist()  # C order = row-major
    return pb.DatasetStats(
        source=source,
        num_images=int(stats.num_images),
        num_pixels=int(stats.num_pixels),
        description=str(stats.source),
        **arrays,
    )


def stats_from_proto(msg: pb.DatasetStats) -> DatasetStats:
    """The statistics in a message (`.source` is its description; `msg.source` the kind)."""
    values: dict[str, Any] = {}
    for name, shape in _STATS_SHAPES.items():
        numbers = getattr(msg, name)
        if len(numbers) != int(np.prod(shape)):
            raise ValueError(f"DatasetStats.{name} must have {int(np.prod(shape))} values, "
                             f"got {len(numbers)}")
        values[name] = np.array(numbers, dtype=np.float64).reshape(shape)
    return DatasetStats(num_images=msg.num_images, num_pixels=msg.num_pixels,
                        source=msg.description or msg.source, **values)


def select_stats_source(requested: str, available: Iterable[str]) -> str:
    """The source a stats choice names: "auto" (or "") is "dataset" when available, else
    "imagenet" (AugmentSpec.stats, GetDatasetRequest.stats).

    Raises ValueError for an unknown source name (INVALID_ARGUMENT) and LookupError for
    a known one this dataset lacks (NOT_FOUND).
    """
    have = list(available)
    if requested in ("", "auto"):
        return "dataset" if "dataset" in have else "imagenet"
    if requested not in STATS_SOURCES:
        raise ValueError(f"GetDatasetRequest.stats: expected one of {', '.join(STATS_CHOICES)} "
                         f"or empty, got {clip(requested)}")
    if requested not in have:
        raise LookupError(f"no {requested!r} statistics for this dataset; available: "
                          f"{', '.join(have) or 'none'}")
    return requested


def dataset_summary(name: str, num_samples: int, num_classes: int) -> pb.DatasetSummary:
    """One entry of ListDatasetsResponse."""
    return pb.DatasetSummary(name=name, num_samples=num_samples, num_classes=num_classes)


def dataset_info(
    name: str,
    num_samples: int,
    classes: Sequence[str],
    stats: Any,
    stats_source: str,
    *,
    num_rejected: int = 0,
    stats_sources: Iterable[str] = (),
    class_counts: Sequence[int] = (),
) -> pb.DatasetInfo:
    """GetDataset's answer.

    `stats` are the `stats_source` ("dataset" or "imagenet") statistics; `stats_sources`
    lists every source available (`stats_source` is always included).
    """
    sources = set(stats_sources) | {stats_source}
    return pb.DatasetInfo(
        name=name,
        num_samples=num_samples,
        classes=list(classes),
        num_rejected=num_rejected,
        stats=stats_to_proto(stats, stats_source),
        stats_sources=sorted(sources, key=_source_order),
        class_counts=[int(c) for c in class_counts],
    )


def _source_order(source: str) -> tuple[int, str]:
    return (STATS_SOURCES.index(source) if source in STATS_SOURCES else len(STATS_SOURCES), source)

