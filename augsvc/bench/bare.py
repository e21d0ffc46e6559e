"""The transport ceiling of `augsvc bench` (c): a bare gRPC stream of raw chunks.

Server: `python -m augsvc.bench.bare --payload-bytes N [--chunk-bytes C] [--port 0]` streams
the same N-byte payload, cut into C-byte chunks, for as long as a client reads; no
protobuf, no framing, no pipeline. Client: `receive(address, streams)` reads it on
`streams` separate connections and yields once per payload received. Same message
limits and chunk size as the real service (`augsvc.wire`), so the two compare.
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc

from augsvc import wire

METHOD = "/augsvc.bench.Bare/Stream"


def _handler(payload: bytes, chunk: int) -> grpc.GenericRpcHandler:
    chunks = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        while context.is_active():
            yield from chunks

    method = grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("augsvc.bench.Bare", {"Stream": method})


def channel(address: str) -> grpc.Channel:
    """A plaintext channel to `address` on its own connection."""
    return grpc.insecure_channel(address, options=wire.channel_options(own_connection=True))


def count_batches(streams: int, payload_bytes: int,
                  messages: Callable[[int], Iterable[object]]) -> Iterator[None]:
    """Yield once per `payload_bytes` of payload received over `streams` threads, forever.

    `messages(i)` is thread i's endless iterable of received messages; bytes and
    memoryviews count as payload, anything else (a batch header) is skipped.
    """
    done: queue.Queue[None] = queue.Queue(maxsize=4 * streams)
    stop = threading.Event()

    def run(i: int) -> None:
        got = 0
        try:
            for message in messages(i):
                if isinstance(message, (bytes, memoryview)):
                    got += len(message)
                    while got >= payload_bytes:
                        got -= payload_bytes
                        if not _put(done, stop):
                            return
                if stop.is_set():
                    return
        except grpc.RpcError:
            return  # the server went away: the consumer's timeout reports it

    for i in range(streams):
        threading.Thread(target=run, args=(i,), daemon=True).start()
    try:
        while True:
            yield done.get(timeout=120)
    finally:
        stop.set()


def _put(done: queue.Queue[None], stop: threading.Event) -> bool:
    """Report one payload; False once the consumer has stopped (never blocks for good)."""
    while not stop.is_set():
        try:
            done.put(None, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def receive(address: str, streams: int, payload_bytes: int) -> Iterator[None]:
    """The bare stream of `main`'s server, counted in payloads of `payload_bytes`."""

    def messages(i: int) -> Iterator[bytes]:
        with channel(address) as ch:
            yield from ch.unary_stream(METHOD)(b"")

    return count_batches(streams, payload_bytes, messages)


def main(argv: list[str] | None = None) -> int:
    """Serve raw chunks until SIGINT/SIGTERM."""
    p = argparse.ArgumentParser(description="bare chunked-bytes gRPC stream (bench ceiling)")
    p.add_argument("--payload-bytes", type=int, required=True, help="bytes of one batch")
    p.add_argument("--chunk-bytes", type=int, default=wire.DEFAULT_CHUNK_BYTES)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         options=wire.server_options())
    server.add_generic_rpc_handlers(
        (_handler(bytes(args.payload_bytes), args.chunk_bytes),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"augsvc-bare: serving raw chunks on {args.host}:{port}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
