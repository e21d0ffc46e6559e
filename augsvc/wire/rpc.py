"""The gRPC side of the wire: channel and server options, the stub and the servicer registrar.

StreamBatches carries pre-encoded frames (`augsvc.wire.frames`), so it needs raw-bytes
serializers on both ends: use `AugmentStub` and `add_augment_servicer` rather than the
generated stub and registrar.
"""

from __future__ import annotations

import itertools
from typing import Any

import grpc

from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire._proto import augment_pb2_grpc as pb_grpc
from augsvc.wire.frames import MAX_MESSAGE_BYTES, decode_frame

__all__ = [
    "RETRY_BUSY",
    "RETRY_DRAINING",
    "RETRY_KEY",
    "SERVICE_NAME",
    "STREAM_BATCHES_METHOD",
    "WORKER_KEY",
    "AugmentStub",
    "add_augment_servicer",
    "channel_options",
    "parse_worker",
    "serialize_frame",
    "server_options",
    "worker_metadata",
]

SERVICE_NAME = "augsvc.v1.Augment"
STREAM_BATCHES_METHOD = f"/{SERVICE_NAME}/StreamBatches"
# Trailing metadata a server sets on a refusal that waiting fixes, whatever its status:
# "busy" (over --max-streams: RESOURCE_EXHAUSTED) or "draining" (shutting down:
# UNAVAILABLE). A client retries such a call later or on another server; a refusal
# without it (an oversized batch, a bad spec, an unknown dataset) is the request's own.
RETRY_KEY = "augsvc-retry"
RETRY_BUSY, RETRY_DRAINING = "busy", "draining"  # its values
# Initial metadata of every StreamBatches call that `augsvc serve` answers: which of its
# worker processes serves the call, "<index>/<count>" (the loader evens its connections
# out over the workers with it: `augsvc.client.placement`).
WORKER_KEY = "augsvc-worker"

_channel_ids = itertools.count(1)


def channel_options(*, own_connection: bool = False) -> list[tuple[str, Any]]:
    """gRPC channel options every augsvc client sets (a fresh list; extend it freely).

    `own_connection=True` gives the channel its own TCP connection: grpc shares one
    between channels with equal arguments, so a distinct `grpc.channel_id` and no
    shared subchannel pool are added (how a client spreads streams over workers).
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if own_connection:
        options += [("grpc.channel_id", next(_channel_ids)),
                    ("grpc.use_local_subchannel_pool", 1)]
    return options


def server_options() -> list[tuple[str, Any]]:
    """gRPC server options every augsvc server sets (a fresh list; extend it freely)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]



def worker_metadata(index: int, count: int) -> tuple[tuple[str, str], ...]:
    """The initial metadata naming worker `index` of `count`."""
    return ((WORKER_KEY, f"{index}/{count}"),)


def parse_worker(metadata: Any) -> tuple[int, int] | None:
    """(index, count) from a call's initial metadata; None when it has none, or a value
    that is not "<index>/<count>" with 0 <= index < count."""
    for key, value in metadata or ():
        if key != WORKER_KEY or not isinstance(value, str):
            continue
        index, _, count = value.partition("/")
        if index.isdigit() and count.isdigit() and int(index) < int(count):
            return int(index), int(count)
    return None


def serialize_frame(frame: bytes | pb.Frame) -> bytes:
    """StreamBatches response serializer: bytes pass through, a Frame is serialized."""
    if type(frame) is bytes:
        return frame
    return frame.SerializeToString()


def add_augment_servicer(servicer: pb_grpc.AugmentServicer, server: Any) -> None:
    """Register `servicer` on a grpc (or grpc.aio) server; its StreamBatches yields bytes.

    Replaces the generated `add_AugmentServicer_to_server`, whose protobuf serializer
    would reject the pre-encoded frames of `encode_batch`.
    """
    handlers = {
        "ListDatasets": grpc.unary_unary_rpc_method_handler(
            servicer.ListDatasets,
            request_deserializer=pb.ListDatasetsRequest.FromString,
            response_serializer=pb.ListDatasetsResponse.SerializeToString,
        ),
        "GetDataset": grpc.unary_unary_rpc_method_handler(
            servicer.GetDataset,
            request_deserializer=pb.GetDatasetRequest.FromString,
            response_serializer=pb.DatasetInfo.SerializeToString,
        ),
        "StreamBatches": grpc.unary_stream_rpc_method_handler(
            servicer.StreamBatches,
            request_deserializer=pb.StreamBatchesRequest.FromString,
            response_serializer=serialize_frame,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)



class AugmentStub(pb_grpc.AugmentStub):
    """The generated client stub, with StreamBatches yielding `decode_frame` results."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.StreamBatches = channel.unary_stream(
            STREAM_BATCHES_METHOD,
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=decode_frame,
        )


