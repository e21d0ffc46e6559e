"""Batch framing: encode -> frames -> decode -> assemble, protocol violations, real gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from augsvc import wire
from augsvc.wire import BatchAssembler, WireError, decode_frame, encode_batch
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire._proto import augment_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Dropped:
    sample_id: int
    path: str
    reason: str


def make_batch(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


def frames_of(array: np.ndarray, index: int = 0, layout: str = "NHWC", chunk: int = 1000,
              dropped: tuple = ()) -> list[bytes]:
    n = array.shape[0]
    return list(encode_batch(
        array, batch_index=index, layout=layout, labels=np.arange(n) % 7,
        sample_ids=np.arange(n) + 100, draw_ids=np.arange(n) + 1000, dropped=dropped,
        chunk_bytes=chunk,
    ))


def roundtrip(frames: list[bytes], **kwargs) -> list[wire.AssembledBatch]:
    return list(wire.assemble((decode_frame(f) for f in frames), **kwargs))


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("chunk", [64, 96, 1000, 1 << 20])
def test_roundtrip_is_exact(dtype: str, layout: str, chunk: int) -> None:
    shape = (3, 8, 4, 3) if layout == "NHWC" else (3, 3, 8, 4)
    array = make_batch(shape, dtype)
    frames = frames_of(array, index=5, layout=layout, chunk=chunk,
                       dropped=(Dropped(7, "cls/bad.jpg", "not a JPEG"),))
    nbytes = array.nbytes
    header = decode_frame(frames[0])
    assert isinstance(header, pb.BatchHeader)
    assert header.num_chunks == len(frames) - 1 == -(-nbytes // chunk)
    assert (tuple(header.shape), header.dtype, header.layout) == (shape, dtype, layout)
    assert header.payload_bytes == nbytes
    assert [len(decode_frame(f)) for f in frames[1:-1]] == [chunk] * (len(frames) - 2)
    assert len(decode_frame(frames[-1])) == nbytes - chunk * (len(frames) - 2)

    [batch] = roundtrip(frames)
    assert batch.header.batch_index == 5
    assert batch.array.dtype == np.dtype(dtype) and batch.array.shape == shape
    assert batch.array.tobytes() == array.tobytes()  # bit-exact
    np.testing.assert_array_equal(batch.labels, np.arange(3) % 7)
    np.testing.assert_array_equal(batch.sample_ids, np.arange(3) + 100)
    np.testing.assert_array_equal(batch.draw_ids, np.arange(3) + 1000)
    assert [(d.sample_id, d.path, d.reason) for d in batch.header.dropped] == [
        (7, "cls/bad.jpg", "not a JPEG")]


def test_consecutive_batches_on_one_stream() -> None:
    arrays = [make_batch((n, 5, 6, 3), "uint8", seed=n) for n in (4, 0, 2)]
    frames = [f for i, a in enumerate(arrays) for f in frames_of(a, index=i, chunk=50)]
    out = roundtrip(frames)
    assert [b.header.batch_index for b in out] == [0, 1, 2]
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b.array)


def test_zero_sample_batch_is_its_header_alone() -> None:
    empty = np.empty((0, 224, 224, 3), dtype=np.uint8)
    frames = frames_of(empty, index=3, dropped=[Dropped(i, f"f{i}", "corrupt") for i in range(2)])
    assert len(frames) == 1
    header = decode_frame(frames[0])
    assert (header.num_chunks, header.payload_bytes, len(header.dropped)) == (0, 0, 2)
    batch = BatchAssembler().feed(header)
    assert batch is not None and batch.array.shape == (0, 224, 224, 3)
    assert batch.labels.shape == (0,)


def test_chunk_frames_are_ordinary_protobuf_frames() -> None:
    """What another language's generated code sees: a Frame with `chunk` set."""
    array = make_batch((2, 10, 10, 3), "float32")
    frames = frames_of(array, chunk=300)
    payload = array.tobytes()
    for i, f in enumerate(frames[1:]):
        parsed = pb.Frame.FromString(f)
        assert parsed.WhichOneof("kind") == "chunk"
        assert parsed.chunk == payload[i * 300 : (i + 1) * 300]
        assert f == pb.Frame(chunk=parsed.chunk).SerializeToString()  # byte-identical
    parsed = pb.Frame.FromString(frames[0])
    assert parsed.WhichOneof("kind") == "header" and parsed.header.num_chunks == len(frames) - 1


def test_large_chunk_lengths_use_multibyte_varints() -> None:
    array = make_batch((1, 1024, 1024, 3), "uint8")  # 3 MiB
    frames = frames_of(array, chunk=wire.MAX_CHUNK_BYTES)
    assert len(frames) == 2
    assert pb.Frame.FromString(frames[1]).chunk == array.tobytes()
    assert bytes(decode_frame(frames[1])) == array.tobytes()


def test_decode_chunk_is_zero_copy() -> None:
    data = pb.Frame(chunk=b"x" * 5000).SerializeToString()
    view = decode_frame(data)
    assert isinstance(view, memoryview) and view.obj is data
    assert view.tobytes() == b"x" * 5000


def test_decode_accepts_other_valid_encodings() -> None:
    # a repeated field: the last value wins, as in every protobuf library
    assert bytes(decode_frame(b"\x12\x01a\x12\x02bc")) == b"bc"
    assert bytes(decode_frame(b"\x12\x00")) == b""
    header = pb.Frame(header=pb.BatchHeader(batch_index=9)).SerializeToString()
    assert decode_frame(header).batch_index == 9


@pytest.mark.parametrize("data", [b"", b"\x12\x05ab", b"\xff\xff\xff"])
def test_decode_rejects_invalid_frames(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_frame(data)


def test_caller_allocated_output_is_filled_in_place() -> None:
    array = make_batch((2, 3, 4, 3), "float16")
    buffers = []

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buffers.append(np.zeros(shape, dtype))
        return buffers[-1]

    [batch] = roundtrip(frames_of(array, chunk=7), allocate=allocate)
    assert batch.array is buffers[0]
    np.testing.assert_array_equal(batch.array, array)


def test_allocate_must_return_a_matching_array() -> None:
    header = decode_frame(frames_of(make_batch((2, 3, 4, 3), "uint8"))[0])
    with pytest.raises(TypeError, match="allocate"):
        BatchAssembler(lambda shape, dtype: np.empty(5, dtype)).feed(header)
    with pytest.raises(TypeError, match="allocate"):
        BatchAssembler(lambda shape, dtype: np.empty(shape, np.float32)).feed(header)


# --- protocol violations --------------------------------------------------------


def header_and_chunks(chunk: int = 40) -> tuple[pb.BatchHeader, list[memoryview]]:
    frames = [decode_frame(f) for f in frames_of(make_batch((2, 3, 4, 3), "uint8"), chunk=chunk)]
    return frames[0], frames[1:]


def test_chunk_before_header() -> None:
    _, chunks = header_and_chunks()
    with pytest.raises(WireError, match="before any batch header"):
        BatchAssembler().feed(chunks[0])


def test_chunk_after_a_complete_batch() -> None:
    header, chunks = header_and_chunks()
    asm = BatchAssembler()
    for frame in [header, *chunks]:
        asm.feed(frame)
    with pytest.raises(WireError, match="before any batch header"):
        asm.feed(chunks[0])


def test_header_while_a_batch_is_incomplete() -> None:
    header, chunks = header_and_chunks()
    asm = BatchAssembler()
    asm.feed(header)
    asm.feed(chunks[0])
    with pytest.raises(WireError, match="incomplete"):
        asm.feed(header)


def test_too_many_bytes() -> None:
    header, chunks = header_and_chunks()
    asm = BatchAssembler()
    asm.feed(header)
    with pytest.raises(WireError, match="more than"):
        for _ in range(len(chunks) + 1):
            asm.feed(chunks[0])


def test_too_few_bytes_in_the_announced_chunks() -> None:
    header, chunks = header_and_chunks()
    asm = BatchAssembler()
    asm.feed(header)
    for c in chunks[:-1]:
        asm.feed(c)
    with pytest.raises(WireError, match="carried"):
        asm.feed(chunks[-1][:-1])
    assert asm.pending is None  # ready for the next header


@pytest.mark.parametrize(("change", "match"), [
    ({"payload_bytes": 71}, "payload_bytes"),
    ({"dtype": "int32"}, "dtype"),
    ({"layout": "HWC"}, "layout"),
    ({"shape": [2, 3, 4]}, "shape"),
    ({"num_chunks": 0}, "0 chunks"),
])
def test_inconsistent_header(change: dict, match: str) -> None:
    header, _ = header_and_chunks()
    bad = pb.BatchHeader()
    bad.CopyFrom(header)
    for name, value in change.items():
        if isinstance(value, list):
            bad.ClearField(name)
            getattr(bad, name).extend(value)
        else:
            setattr(bad, name, value)
    with pytest.raises(WireError, match=match):
        BatchAssembler().feed(bad)


def test_label_count_must_match_the_samples() -> None:
    header, _ = header_and_chunks()
    header.labels.append(1)
    with pytest.raises(WireError, match="labels"):
        BatchAssembler().feed(header)


def test_stream_ending_mid_batch() -> None:
    frames = frames_of(make_batch((2, 3, 4, 3), "uint8"), index=4, chunk=20)
    with pytest.raises(WireError, match="middle of batch 4"):
        roundtrip(frames[:-1])


def test_reset_discards_an_incomplete_batch() -> None:
    frames = [decode_frame(f) for f in frames_of(make_batch((2, 3, 4, 3), "uint8"), chunk=20)]
    asm = BatchAssembler()
    asm.feed(frames[0])
    asm.feed(frames[1])
    assert asm.pending is not None
    asm.reset()
    out = [b for f in frames if (b := asm.feed(f)) is not None]
    assert len(out) == 1


# --- encoder argument checks ------------------------------------------------------


def test_encoder_rejects_bad_payloads() -> None:
    good = make_batch((2, 3, 4, 3), "uint8")
    kwargs = dict(batch_index=0, layout="NHWC", labels=[0, 1], sample_ids=[0, 1],
                  draw_ids=[0, 1])
    with pytest.raises(ValueError, match="C-contiguous"):
        encode_batch(good[:, ::2], **kwargs)
    with pytest.raises(ValueError, match="little-endian"):
        encode_batch(good.astype(">f4"), **kwargs)
    with pytest.raises(ValueError, match="dtype"):
        encode_batch(good.astype(np.int32), **kwargs)
    with pytest.raises(ValueError, match="labels"):
        encode_batch(good, **{**kwargs, "labels": [0]})
    with pytest.raises(ValueError, match="dimensions"):
        encode_batch(good[0], **kwargs)
    with pytest.raises(ValueError, match="chunk_bytes"):
        encode_batch(good, chunk_bytes=0, **kwargs)
    with pytest.raises(ValueError, match="chunk_bytes"):
        encode_batch(good, chunk_bytes=wire.MAX_CHUNK_BYTES + 1, **kwargs)


def test_resolve_chunk_bytes() -> None:
    assert wire.resolve_chunk_bytes(0) == wire.DEFAULT_CHUNK_BYTES == 2 << 20
    assert wire.resolve_chunk_bytes(1) == wire.MIN_CHUNK_BYTES
    assert wire.resolve_chunk_bytes(1 << 30) == wire.MAX_CHUNK_BYTES
    assert wire.resolve_chunk_bytes(1 << 20) == 1 << 20


def test_message_limits_cover_the_largest_chunk_frame() -> None:
    for options in (wire.channel_options(), wire.server_options()):
        opts = dict(options)
        assert opts["grpc.max_send_message_length"] == wire.MAX_MESSAGE_BYTES
        assert opts["grpc.max_receive_message_length"] == wire.MAX_MESSAGE_BYTES
    assert wire.MAX_MESSAGE_BYTES >= wire.MAX_CHUNK_BYTES + 16


# --- over a real gRPC connection on loopback ---------------------------------------


class EchoServicer(pb_grpc.AugmentServicer):
    """Streams the given arrays as batches; `chunk_bytes` comes from the request."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def ListDatasets(self, request, context):
        return pb.ListDatasetsResponse(datasets=[pb.DatasetSummary(name="toy", num_samples=3)])

    def StreamBatches(self, request, context) -> Iterator[bytes]:
        chunk = wire.resolve_chunk_bytes(request.chunk_bytes)
        for k in request.batches or range(len(self.arrays)):
            yield from frames_of(self.arrays[k], index=k, chunk=chunk)


@pytest.fixture
def served():
    arrays = [make_batch((3, 700, 1000, 3), "uint8", seed=1),  # 6.3 MB, > grpc's 4 MiB default
              np.empty((0, 700, 1000, 3), np.uint8),
              make_batch((2, 3, 64, 64), "float16", seed=2)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=wire.server_options())
    wire.add_augment_servicer(EchoServicer(arrays), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield arrays, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_stream_over_grpc_with_the_largest_chunks(served) -> None:
    arrays, address = served
    with grpc.insecure_channel(address, options=wire.channel_options()) as channel:
        stub = wire.AugmentStub(channel)
        assert stub.ListDatasets(pb.ListDatasetsRequest()).datasets[0].name == "toy"
        request = pb.StreamBatchesRequest(dataset="toy", batches=[2, 0, 1],
                                          chunk_bytes=wire.MAX_CHUNK_BYTES)
        out = list(wire.assemble(stub.StreamBatches(request)))
    assert [b.header.batch_index for b in out] == [2, 0, 1]
    for b in out:
        np.testing.assert_array_equal(b.array, arrays[b.header.batch_index])
    assert out[1].header.num_chunks == 2


def test_generated_protobuf_client_decodes_the_stream(served) -> None:
    """A client built only from the .proto (the generated stub) reads the same batches."""
    arrays, address = served
    with grpc.insecure_channel(address, options=wire.channel_options()) as channel:
        frames = list(pb_grpc.AugmentStub(channel).StreamBatches(
            pb.StreamBatchesRequest(dataset="toy", chunk_bytes=100_000)))
    batches, payload = [], bytearray()
    for frame in frames:
        if frame.WhichOneof("kind") == "header":
            batches.append([frame.header, payload := bytearray()])
        else:
            payload += frame.chunk
    assert len(batches) == 3
    for header, data in batches:
        assert len(data) == header.payload_bytes
        array = np.frombuffer(bytes(data), dtype=np.dtype(header.dtype).newbyteorder("<"))
        np.testing.assert_array_equal(array.reshape(tuple(header.shape)),
                                      arrays[header.batch_index])
