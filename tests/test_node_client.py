"""Cross-language check: the Node.js client in examples/node-client, written from the
.proto alone, lists datasets and decodes the same batches as the Python wire decoder.

Needs `node` on PATH and `npm ci` run in examples/node-client (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from serverproc import REPO_ROOT, ServerProcess, running_server

from augsvc import wire
from augsvc.core.spec import AugmentSpec
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

CLIENT_DIR = REPO_ROOT / "examples" / "node-client"
NODE = shutil.which("node")
NAME = "photos"
# The spec client.js sends (size, hsv and pca set; every other field left unset, so the
# server's defaults apply). The Python side sends every field explicitly, so equal
# batches also show that the server's defaults are AugmentSpec's.
SPEC = AugmentSpec(size=(32, 32), hsv=False, pca=False)
SEED, EPOCH, BATCH_SIZE = 11, 1, 4
BATCHES = [2, 0, 1]  # 12 samples in batches of 4: every batch, out of order

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH"),
    pytest.mark.skipif(
        not (CLIENT_DIR / "node_modules").is_dir(),
        reason="examples/node-client/node_modules is missing (run `npm ci` there)",
    ),
]


@pytest.fixture(scope="module")
def server(jpeg_folder: Path) -> Iterator[ServerProcess]:
    with running_server({NAME: jpeg_folder}, "--dali-threads", "1") as proc:
        yield proc


def run_node(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, "client.js", address, *args], cwd=CLIENT_DIR,
                          capture_output=True, text=True, timeout=60, check=False)


def python_batches(address: str) -> list[wire.AssembledBatch]:
    request = pb.StreamBatchesRequest(dataset=NAME, spec=spec_to_proto(SPEC), seed=SEED,
                                      epoch=EPOCH, batch_size=BATCH_SIZE, batches=BATCHES)
    with grpc.insecure_channel(address, options=wire.channel_options()) as channel:
        frames = wire.AugmentStub(channel).StreamBatches(request, timeout=60)
        return list(wire.assemble(frames))


def test_node_client_decodes_the_same_batches(server: ServerProcess) -> None:
    result = run_node(server.address, NAME, str(SEED), str(EPOCH), str(BATCH_SIZE),
                      *map(str, BATCHES))
    assert result.returncode == 0, f"node client failed:\n{result.stderr}"
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    datasets = [line["dataset"] for line in lines if "dataset" in line]
    got = [line for line in lines if "batch_index" in line]
    assert len(datasets) + len(got) == len(lines), result.stdout

    assert datasets == [{"name": NAME, "num_samples": 12, "num_classes": 3}]
    want = python_batches(server.address)
    assert [b["batch_index"] for b in got] == BATCHES
    assert [b.header.batch_index for b in want] == BATCHES
    for node_batch, py_batch in zip(got, want, strict=True):
        index = node_batch["batch_index"]
        assert node_batch["shape"] == list(py_batch.array.shape) == [BATCH_SIZE, 32, 32, 3]
        assert node_batch["dtype"] == py_batch.array.dtype.name == "uint8"
        assert node_batch["layout"] == py_batch.header.layout == "NHWC"
        assert node_batch["labels"] == py_batch.labels.tolist(), f"batch {index}"
        assert node_batch["sample_ids"] == py_batch.sample_ids.tolist(), f"batch {index}"
        digest = hashlib.sha256(py_batch.array.tobytes()).hexdigest()
        assert node_batch["sha256"] == digest, f"batch {index}: pixels differ"


def test_node_client_reports_server_errors(server: ServerProcess) -> None:
    result = run_node(server.address, NAME, str(SEED), str(EPOCH), str(BATCH_SIZE), "99")
    assert result.returncode == 1, result.stdout
    assert "INVALID_ARGUMENT" in result.stderr and "batches" in result.stderr, result.stderr
    assert '"batch_index"' not in result.stdout
