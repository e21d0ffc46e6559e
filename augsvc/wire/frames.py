"""Batch framing on the StreamBatches stream: one header Frame, then raw chunk Frames.

The wire format is documented in protos/augsvc/v1/augment.proto (message `Frame`). A
batch is a `Frame{header}` followed by `header.num_chunks` `Frame{chunk}` messages
whose bytes, concatenated, are the C-contiguous little-endian pixel array.

No protobuf copy of the pixel payload: StreamBatches uses raw-bytes (de)serializers on
both sides. The server hand-encodes each chunk frame as `0x12 varint(len) payload`,
which *is* a serialized `Frame` with `chunk` set (any protobuf library decodes it),
built with one copy from a memoryview of the array. The client's `decode_frame` returns
a chunk as a zero-copy memoryview past the varint, and `BatchAssembler` copies it
straight into the output array (optionally caller-allocated, e.g. pinned memory).

`augsvc.wire.rpc` installs these (de)serializers on the stub and the servicer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from augsvc.wire._proto import augment_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "MIN_CHUNK_BYTES",
    "AssembledBatch",
    "BatchAssembler",
    "WireError",
    "assemble",
    "batch_header",
    "decode_frame",
    "encode_batch",
    "encode_chunks",
    "resolve_chunk_bytes",
]

DEFAULT_CHUNK_BYTES = 2 << 20  # 2 MiB: measured ~2x faster than one message per batch
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 4 << 20
# A header carries ~3 varints per sample plus dropped paths: 4 MiB covers batches of
# >100k samples. Requests (a list of batch indices) are far smaller.
HEADER_HEADROOM_BYTES = 4 << 20
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + HEADER_HEADROOM_BYTES


# dtype name on the wire -> the little-endian numpy dtype of the payload
WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ("uint8", "float16", "float32")}
LAYOUTS = ("NHWC", "NCHW")

_CHUNK_TAG = 0x12  # field 2 (`chunk`), wire type 2 (length-delimited)


class WireError(ValueError):
    """The frames on a StreamBatches stream break the wire protocol."""


def resolve_chunk_bytes(requested: int) -> int:
    """A request's `chunk_bytes`: 0 -> the default, else clamped to [MIN, MAX]_CHUNK_BYTES."""
    if requested <= 0:
        return DEFAULT_CHUNK_BYTES
    return min(max(requested, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _chunk_prefix(size: int) -> bytes:
    return bytes((_CHUNK_TAG,)) + _varint(size)


# ---------------------------------------------------------------------------
# server side


def _payload_view(payload: np.ndarray) -> memoryview:
    """Flat uint8 memoryview of a C-contiguous little-endian wire array (no copy)."""
    if not isinstance(payload, np.ndarray):
        raise TypeError(f"payload must be a numpy array, got {type(payload).__name__}")
    if payload.dtype.name not in WIRE_DTYPES or payload.dtype != WIRE_DTYPES[payload.dtype.name]:
        raise ValueError(f"payload dtype must be little-endian {', '.join(WIRE_DTYPES)}, "
                         f"got {payload.dtype.str}")
    if not payload.flags.c_contiguous:
        raise ValueError("payload must be C-contiguous (np.ascontiguousarray makes a copy)")
    return memoryview(payload.reshape(-1).view(np.uint8))


def batch_header(
    payload: np.ndarray,
    *,
    batch_index: int,
    layout: str,
    labels: Sequence[int] | np.ndarray,
    sample_ids: Sequence[int] | np.ndarray,
    draw_ids: Sequence[int] | np.ndarray,
    dropped: Iterable[Any] = (),
    substituted: Iterable[Any] = (),
    stats_source: str = "",
    stats_digest: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> pb.BatchHeader:
    """The BatchHeader describing `payload` sent in chunks of `chunk_bytes`.

    `dropped` holds objects with `sample_id`, `path` and `reason` attributes (e.g.
    `DroppedSample` or `pb.DroppedSample`); `substituted` objects with `row`,
    `sample_id`, `path`, `reason` and `substitute_id` (e.g. `Substitution`).
    """
    _payload_view(payload)  # type, dtype and contiguity checks
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if payload.ndim != len(layout):
        raise ValueError(f"a {layout} payload has {len(layout)} dimensions, got shape "
                         f"{payload.shape}")
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    n = payload.shape[0]
    columns = {"labels": labels, "sample_ids": sample_ids, "draw_ids": draw_ids}
    lists = {k: np.asarray(v, dtype=np.int64).reshape(-1).tolist() for k, v in columns.items()}
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for a batch of {n} samples")
    return pb.BatchHeader(
        batch_index=batch_index,
        shape=payload.shape,
        dtype=payload.dtype.name,
        layout=layout,
        payload_bytes=payload.nbytes,
        num_chunks=-(-payload.nbytes // chunk_bytes),
        dropped=[pb.DroppedSample(sample_id=int(d.sample_id), path=str(d.path),
                                  reason=str(d.reason)) for d in dropped],
        substituted=[pb.Substitution(row=int(s.row), sample_id=int(s.sample_id),
                                     path=str(s.path), reason=str(s.reason),
                                     substitute_id=int(s.substitute_id)) for s in substituted],
        stats_source=stats_source,
        stats_digest=stats_digest,
        **lists,
    )


def encode_chunks(payload: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized `Frame{chunk}` messages carrying `payload`, one copy each.

    The array is read lazily: do not modify it until the iterator is exhausted.
    """
    view = _payload_view(payload)
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    return _chunk_frames(view, chunk_bytes)


def _chunk_frames(view: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    total = len(view)
    full = _chunk_prefix(chunk_bytes)
    join = b"".join
    for start in range(0, total, chunk_bytes):
        part = view[start : start + chunk_bytes]
        yield join((full if len(part) == chunk_bytes else _chunk_prefix(len(part)), part))


def encode_batch(
    payload: np.ndarray,
    *,
    batch_index: int,
    layout: str,
    labels: Sequence[int] | np.ndarray,
    sample_ids: Sequence[int] | np.ndarray,
    draw_ids: Sequence[int] | np.ndarray,
    dropped: Iterable[Any] = (),
    substituted: Iterable[Any] = (),
    stats_source: str = "",
    stats_digest: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The serialized Frames of one batch: the header (see `batch_header`), then the chunks.

    Arguments are checked now (ValueError), not when iterating. The array is read
    lazily: do not modify it until the iterator is exhausted.
    """
    header = batch_header(
        payload, batch_index=batch_index, layout=layout, labels=labels,
        sample_ids=sample_ids, draw_ids=draw_ids, dropped=dropped, substituted=substituted,
        stats_source=stats_source, stats_digest=stats_digest, chunk_bytes=chunk_bytes,
    )
    view = _payload_view(payload)
    header_frame = pb.Frame(header=header).SerializeToString()
    if len(header_frame) > MAX_MESSAGE_BYTES:
        raise ValueError(f"batch {batch_index}: header is {len(header_frame)} bytes, over the "
                         f"{MAX_MESSAGE_BYTES}-byte message limit; use smaller batches")
    return _batch_frames(header_frame, view, chunk_bytes)


def _batch_frames(header_frame: bytes, view: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    yield header_frame
    yield from _chunk_frames(view, chunk_bytes)


# ---------------------------------------------------------------------------
# client side


def decode_frame(data: bytes) -> pb.BatchHeader | memoryview:
    """StreamBatches response deserializer: a BatchHeader, or a chunk's payload (no copy)."""
    if data[:1] == b"\x12":  # fast path: exactly one `chunk` field
        size = shift = 0
        pos = 1
        end = len(data)
        while pos < end:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            if byte < 0x80:
                if pos + size == end:
                    return memoryview(data)[pos:]
                break
            shift += 7
    try:  # any other valid encoding of a Frame
        frame = pb.Frame.FromString(data)
    except DecodeError as exc:
        raise WireError(f"not a valid Frame ({len(data)} bytes): {exc}") from exc
    kind = frame.WhichOneof("kind")
    if kind == "chunk":
        return memoryview(frame.chunk)
    if kind == "header":
        return frame.header
    raise WireError(f"a Frame with neither header nor chunk ({len(data)} bytes)")


class AssembledBatch(NamedTuple):
    """A complete batch: its header and the array (shape, dtype as the header says)."""

    header: pb.BatchHeader
    array: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class indices."""
        return np.array(self.header.labels, dtype=np.int64)

    @property
    def sample_ids(self) -> np.ndarray:
        """(N,) int64 dataset indices."""
        return np.array(self.header.sample_ids, dtype=np.int64)

    @property
    def draw_ids(self) -> np.ndarray:
        """(N,) int64 draw ids."""
        return np.array(self.header.draw_ids, dtype=np.int64)


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


class BatchAssembler:
    """Turns decoded frames back into batches, copying each chunk straight into place.

    `allocate(shape, dtype)` returns the writable C-contiguous array to fill (default
    `np.empty`); to fill pinned torch memory, return `tensor.numpy()` and keep the tensor.
    """

    def __init__(self, allocate: Allocate | None = None) -> None:
        self._allocate = allocate or _empty
        self.reset()

    def reset(self) -> None:
        """Forget any incomplete batch (e.g. after its stream failed)."""
        self.pending: pb.BatchHeader | None = None  # header of the incomplete batch
        self._out: np.ndarray | None = None
        self._view: np.ndarray | None = None  # the output as flat bytes
        self._pos = self._size = self._chunks = self._num_chunks = 0

    def feed(self, frame: pb.BatchHeader | memoryview | bytes) -> AssembledBatch | None:
        """Take one `decode_frame` result; return the batch it completes, if any."""
        view = self._view
        if view is None:
            if isinstance(frame, pb.BatchHeader):
                return self._start(frame)
            raise WireError("chunk frame before any batch header")
        if isinstance(frame, pb.BatchHeader):
            raise WireError(f"header of batch {frame.batch_index} while batch "
                            f"{self.pending.batch_index} is incomplete "
                            f"({self._chunks}/{self._num_chunks} chunks)")
        end = self._pos + len(frame)
        if end > self._size:
            raise WireError(f"batch {self.pending.batch_index}: chunks carry more than the "
                            f"{self._size} payload bytes of its header")
        np.copyto(view[self._pos : end], np.frombuffer(frame, np.uint8))  # GIL released
        self._pos = end
        self._chunks += 1
        if self._chunks == self._num_chunks:
            return self._finish()
        return None

    def _start(self, header: pb.BatchHeader) -> AssembledBatch | None:
        index = header.batch_index
        dtype = WIRE_DTYPES.get(header.dtype)
        if dtype is None:
            raise WireError(f"batch {index}: unknown dtype {header.dtype!r}")
        if header.layout not in LAYOUTS:
            raise WireError(f"batch {index}: unknown layout {header.layout!r}")
        shape = tuple(header.shape)
        if len(shape) != len(header.layout):
            raise WireError(f"batch {index}: shape {shape} does not match layout {header.layout}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if header.payload_bytes != size:
            raise WireError(f"batch {index}: payload_bytes {header.payload_bytes} != "
                            f"{size} for shape {shape} of {header.dtype}")
        n = shape[0]
        for name in ("labels", "sample_ids", "draw_ids"):
            if len(getattr(header, name)) != n:
                raise WireError(f"batch {index}: {len(getattr(header, name))} {name} for "
                                f"{n} samples")
        if size > 0 and header.num_chunks == 0:
            raise WireError(f"batch {index}: {size} payload bytes in 0 chunks")
        out = self._allocate(shape, dtype)
        if not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
                and out.flags.c_contiguous and out.flags.writeable):
            raise TypeError(f"allocate{(shape, dtype)} must return a writable C-contiguous "
                            f"numpy array of that shape and dtype, got {out!r:.80}")
        if header.num_chunks == 0:
            return AssembledBatch(header, out)
        self.pending, self._out = header, out
        self._view = out.reshape(-1).view(np.uint8)
        self._pos, self._size = 0, size
        self._chunks, self._num_chunks = 0, header.num_chunks
        return None

    def _finish(self) -> AssembledBatch:
        header, out, received = self.pending, self._out, self._pos
        self.reset()
        if received != header.payload_bytes:
            raise WireError(f"batch {header.batch_index}: {header.num_chunks} chunks carried "
                            f"{received} bytes, header says {header.payload_bytes}")
        return AssembledBatch(header, out)


def assemble(
    frames: Iterable[pb.BatchHeader | memoryview | bytes], allocate: Allocate | None = None
) -> Iterator[AssembledBatch]:
    """Batches from a stream of decoded frames; WireError if it ends mid-batch."""
    assembler = BatchAssembler(allocate)
    for frame in frames:
        batch = assembler.feed(frame)
        if batch is not None:
            yield batch
    if assembler.pending is not None:
        raise WireError(f"stream ended in the middle of batch {assembler.pending.batch_index}")
