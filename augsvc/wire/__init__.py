"""The wire layer: the gRPC API's generated messages, batch frames, and conversions to core types.

`augsvc.wire.frames` cuts batches into frames and puts them back together;
`augsvc.wire.rpc` holds the channel/server options, the stub and the servicer
registrar; `augsvc.wire.convert` maps protobuf messages to and from `augsvc.core`
values. The names below are the ones the client and server use.
"""

from augsvc.wire.frames import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    MIN_CHUNK_BYTES,
    Allocate,
    AssembledBatch,
    BatchAssembler,
    WireError,
    assemble,
    batch_header,
    decode_frame,
    encode_batch,
    encode_chunks,
    resolve_chunk_bytes,
)
from augsvc.wire.rpc import (
    RETRY_BUSY,
    RETRY_DRAINING,
    RETRY_KEY,
    SERVICE_NAME,
    STREAM_BATCHES_METHOD,
    WORKER_KEY,
    AugmentStub,
    add_augment_servicer,
    channel_options,
    parse_worker,
    serialize_frame,
    server_options,
    worker_metadata,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "MIN_CHUNK_BYTES",
    "RETRY_BUSY",
    "RETRY_DRAINING",
    "RETRY_KEY",
    "SERVICE_NAME",
    "STREAM_BATCHES_METHOD",
    "WORKER_KEY",
    "Allocate",
    "AssembledBatch",
    "AugmentStub",
    "BatchAssembler",
    "WireError",
    "add_augment_servicer",
    "assemble",
    "batch_header",
    "channel_options",
    "decode_frame",
    "encode_batch",
    "encode_chunks",
    "parse_worker",
    "resolve_chunk_bytes",
    "serialize_frame",
    "server_options",
    "worker_metadata",
]
