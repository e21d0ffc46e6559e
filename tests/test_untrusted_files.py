"""Files in a dataset folder are not trusted (issue 9.7): links, FIFOs, devices, loops, growth.

Every case uses real files in a tmp dataset and the real engine or a real `augsvc serve`:
the failure is reported by kind (never the file's content), with a path relative to the
dataset root, quickly (a FIFO never blocks, /dev/zero is never read).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from serverproc import running_server

from augsvc import wire
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import MAX_FILE_BYTES, DatasetIndex, open_dataset
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False, corrupt="drop")  # dropped: reported
SECRET = b"root:x:0:0:TOP-SECRET-LINE"
OUTSIDE = "resolves outside the dataset root"
MakeDataset = Callable[..., Path]


def _secret_of_size(path: Path, size: int) -> Path:
    """A file outside the dataset holding SECRET, padded to `size` bytes."""
    path.write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
    return path


def _swap_after_indexing(index: DatasetIndex, tmp_path: Path) -> dict[str, str]:
    """Replace images 0-4 of an indexed dataset; {relative path: expected reason start}."""
    outside = tmp_path / "outside"
    outside.mkdir()
    paths = [Path(p) for p in index.paths[:5]]
    for p in paths:
        p.unlink()
    os.symlink(_secret_of_size(outside / "secret.txt", int(index.sizes[0])), paths[0])
    os.mkfifo(paths[1])
    os.symlink("/dev/zero", paths[2])
    paths[3].write_bytes(b"")  # shrunk to nothing
    return {
        index.relpath(0): OUTSIDE,
        index.relpath(1): "not a regular file (a FIFO)",
        index.relpath(2): "not a regular file (a character device)",
        index.relpath(3): "changed since indexing: 0 bytes",
        index.relpath(4): "unreadable: No such file or directory",
    }


def _grow(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 100)


def _assert_no_leak(dropped: list, root: Path) -> None:
    for d in dropped:
        assert not os.path.isabs(d.path) and str(root) not in d.path, d
        assert "root:" not in d.reason and SECRET.hex()[:16] not in d.reason, d
        assert "TOP-SECRET" not in d.reason and str(root) not in d.reason, d


@pytest.mark.timeout(60)
def test_engine_refuses_swapped_files_by_kind(
        tmp_dataset: MakeDataset, tmp_path: Path) -> None:
    root = tmp_dataset(per_class=4)
    index = open_dataset(root)
    allowed = open_dataset(root, allow_outside=True)  # the same files, links may leave it
    expected = _swap_after_indexing(index, tmp_path)
    _grow(index.paths[5])
    expected[index.relpath(5)] = "changed since indexing: "
    engine = Augmenter(index, SPEC, IMAGENET, max_batch_size=8)
    out = engine.run(0, 0, range(8), range(8))  # today: blocks on the FIFO (the timeout)
    reasons = {d.path: d.reason for d in out.dropped}
    assert set(reasons) == set(expected)
    for rel, start in expected.items():
        assert reasons[rel].startswith(start), (rel, reasons[rel])
    _assert_no_leak(list(out.dropped), root)
    assert out.sample_ids.tolist() == [6, 7] and out.images.shape == (2, 32, 32, 3)
    # substituted instead of dropped: reported the same way
    subst = Augmenter(index, SPEC.replace(corrupt="substitute"), IMAGENET, max_batch_size=8)
    result = subst.run(0, 0, range(8), range(8))
    reported = [*result.substituted, *result.dropped]
    assert {r.path for r in reported} == set(expected)
    _assert_no_leak(reported, root)
    subst.close()
    # allowed outside the root, the same-size secret is read, and still not echoed
    engine_out = Augmenter(allowed, SPEC, IMAGENET, max_batch_size=1).run(0, 0, [0], [0])
    (only,) = engine_out.dropped
    assert only.reason == "not an image (unknown signature)"
    engine.close()


@pytest.mark.timeout(60)
def test_indexing_rejects_fifos_devices_and_huge_files(
        tmp_dataset: MakeDataset, tmp_path: Path) -> None:
    root = tmp_dataset()
    os.mkfifo(root / "class_00" / "pipe.jpg")
    os.symlink("/dev/zero", root / "class_00" / "zero.jpg")
    huge = root / "class_01" / "huge.jpg"
    with open(huge, "wb") as f:  # sparse: costs no disk
        f.write(b"\xff\xd8\xff")
        f.truncate(MAX_FILE_BYTES + 1)
    index = open_dataset(root)
    reasons = {Path(p).name: r for p, r in index.rejected}
    assert reasons["pipe.jpg"] == "not a regular file (a FIFO)"
    assert reasons["zero.jpg"].startswith(OUTSIDE)
    assert reasons["huge.jpg"].startswith("too large")
    allowed = {Path(p).name: r for p, r in open_dataset(root, allow_outside=True).rejected}
    assert allowed["zero.jpg"] == "not a regular file (a character device)"
    assert len(index) == 6


def test_directory_links_are_followed_once_and_never_loop(
        tmp_dataset: MakeDataset, tmp_path: Path) -> None:
    root = tmp_dataset()  # class_00, class_01: 3 images each
    os.symlink("..", root / "class_00" / "loop")
    os.symlink("../class_00", root / "class_01" / "again")  # a second name for a class
    extra = root / ".extra"  # hidden: not a class, reached only through the link below
    extra.mkdir()
    (extra / "more.jpg").write_bytes((root / "class_00" / "img_0000.jpg").read_bytes())
    os.symlink("../.extra", root / "class_01" / "extra")
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (outside / "far.jpg").write_bytes((root / "class_00" / "img_0000.jpg").read_bytes())
    os.symlink(outside, root / "class_00" / "far")
    index = open_dataset(root)
    names = [index.relpath(i) for i in range(len(index))]
    assert len(index) == 7, names  # 3 + 3 + the linked extra folder once
    assert "class_01/extra/more.jpg" in names
    assert index.labels[names.index("class_01/extra/more.jpg")] == 1
    reasons = {Path(p).name: r for p, r in index.rejected}
    assert reasons["loop"].startswith("folder already walked")
    assert reasons["again"].startswith("folder already walked")
    assert reasons["far"].startswith(OUTSIDE)
    with_far = open_dataset(root, allow_outside=True)
    assert len(with_far) == 8 and "loop" in {Path(p).name for p, _ in with_far.rejected}


def _outside_dataset(tmp_dataset: MakeDataset, tmp_path: Path) -> tuple[Path, Path]:
    """A folder with a file link leaving it, and a manifest with a row leaving its folder."""
    root = tmp_dataset()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jpeg = (root / "class_00" / "img_0000.jpg").read_bytes()
    (elsewhere / "b.jpg").write_bytes(jpeg)
    os.symlink(elsewhere / "b.jpg", root / "class_01" / "linked.jpg")
    manifest = root / "list.csv"
    manifest.write_text("path,label\nclass_00/img_0000.jpg,0\n../elsewhere/b.jpg,1\n"
                        f"{elsewhere / 'b.jpg'},1\n")
    return root, manifest


def test_links_and_manifest_rows_outside_the_root_are_refused(
        tmp_dataset: MakeDataset, tmp_path: Path) -> None:
    root, manifest = _outside_dataset(tmp_dataset, tmp_path)
    folder = open_dataset(root)
    assert len(folder) == 6
    assert next(r for p, r in folder.rejected if p.endswith("linked.jpg")).startswith(OUTSIDE)
    rows = open_dataset(manifest)
    assert len(rows) == 1 and len(rows.rejected) == 2
    assert all(r.startswith(OUTSIDE) for _, r in rows.rejected)
    assert len(open_dataset(root, allow_outside=True)) == 7
    assert len(open_dataset(manifest, allow_outside=True)) == 3


def _request(dataset: str, batch_size: int) -> pb.StreamBatchesRequest:
    return pb.StreamBatchesRequest(dataset=dataset, spec=spec_to_proto(SPEC), seed=1, epoch=0,
                                   batch_size=batch_size, tail="pad", batches=[0])


@pytest.mark.timeout(120)
def test_server_reports_swapped_files_by_kind_with_relative_paths(
        tmp_dataset: MakeDataset, tmp_path: Path) -> None:
    root = tmp_dataset(per_class=4)
    index = open_dataset(root)
    with running_server({"d": root}, "--dali-threads", "1") as server:
        expected = _swap_after_indexing(index, tmp_path)
        channel = grpc.insecure_channel(server.address, options=wire.channel_options())
        stub = wire.AugmentStub(channel)
        for _ in range(3):  # a retry is answered the same (today: DEADLINE_EXCEEDED)
            frames = stub.StreamBatches(_request("d", 8), timeout=20)
            (batch,) = list(wire.assemble(frames))
            dropped = list(batch.header.dropped)
            assert {d.path for d in dropped} == set(expected)
            for d in dropped:
                assert d.reason.startswith(expected[d.path]), d
            _assert_no_leak(dropped, root)
            assert batch.array.shape[0] == 3
        # status details and dataset descriptions name no server path either
        with pytest.raises(grpc.RpcError) as info:
            wire.AugmentStub(channel).GetDataset(pb.GetDatasetRequest(name="d", stats="dataset"),
                                                 timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert str(root) not in info.value.details()
        assert "<folder of dataset d>" in info.value.details()
        channel.close()
        assert SECRET.decode() not in server.stderr()


@pytest.mark.timeout(120)
def test_serve_allow_outside_root_serves_what_is_refused_by_default(
        tmp_dataset: MakeDataset, tmp_path: Path) -> None:
    root, manifest = _outside_dataset(tmp_dataset, tmp_path)
    with running_server({"f": root, "m": manifest}, "--dali-threads", "1",
                        "--allow-outside-root") as server:
        channel = grpc.insecure_channel(server.address, options=wire.channel_options())
        listed = wire.AugmentStub(channel).ListDatasets(pb.ListDatasetsRequest(), timeout=10)
        counts = {d.name: d.num_samples for d in listed.datasets}
        assert counts == {"f": 7, "m": 3}
        (batch,) = list(wire.assemble(wire.AugmentStub(channel).StreamBatches(
            _request("m", 3), timeout=30)))
        assert batch.array.shape[0] == 3 and not batch.header.dropped
        assert sorted(batch.labels.tolist()) == [0, 1, 1]
        channel.close()
