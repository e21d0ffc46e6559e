"""Shared fixtures: small synthetic datasets of real JPEGs (made by `augsvc.engine.synth`).

* `jpeg_folder` (session): `root/class_00..class_02/img_0000..0003.jpg`, 12 photo-like
  JPEGs around 500x375 (two of them portrait), ~40 KB each, made once per test run
  (~0.3 s). Shared by every test: do not add, remove or edit files in it (opening it
  with `open_dataset` is fine: it only writes the index cache); use `tmp_dataset`
  for a dataset a test changes.
* `corrupt_folder` (session): a copy of `jpeg_folder` with `class_01/img_0002.jpg`
  truncated (fails the byte screen) and `class_02/img_0001.jpg` undecodable (passes it,
  fails in DALI).
* `tmp_dataset` (function): a factory `tmp_dataset(**kwargs) -> Path` writing a fresh
  folder under the test's `tmp_path` per call; kwargs go to `synth.make_dataset`
  (defaults here: 2 classes x 3 images of 96x128, for speed).
* `host_transfer` (function): a factory `host_transfer(delay=0.0)` of
  `standin.HostTransfer`s (the CPU stand-in for the loader's CUDA copies), whose worker
  threads end with the test.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# gRPC core's own INFO lines ("Got goaway" when a test stops a server under a call) off
# pytest's output, as augsvc.client.quiet keeps them off a trainer's: grpcio reads this
# once, when first imported, and test modules import grpc before any augsvc module does.
# tests/test_quiet_logs.py runs its trainers without it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from augsvc.engine.synth import make_dataset

JPEG_FOLDER_CLASSES = 3
JPEG_FOLDER_PER_CLASS = 4


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared, read-only-by-convention image folder: 3 classes x 4 JPEGs (see module doc)."""
    root = tmp_path_factory.mktemp("jpeg_folder")
    return make_dataset(root, num_classes=JPEG_FOLDER_CLASSES, per_class=JPEG_FOLDER_PER_CLASS)


def _undecodable(jpeg: bytes) -> bytes:
    """A JPEG with intact markers and EOI whose frame header names an undefined
    quantisation table: it passes indexing and the byte screen, and fails in DALI."""
    data = bytearray(jpeg)
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    for c in range(data[pos + 9]):
        data[pos + 10 + 3 * c + 2] = 3
    return bytes(data)


@pytest.fixture(scope="session")
def corrupt_folder(jpeg_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jpeg_folder's images, one truncated and one undecodable."""
    root = tmp_path_factory.mktemp("corrupt") / "data"
    shutil.copytree(jpeg_folder, root, ignore=shutil.ignore_patterns(".*"))
    truncated = root / "class_01" / "img_0002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:4000])
    broken = root / "class_02" / "img_0001.jpg"
    broken.write_bytes(_undecodable(broken.read_bytes()))
    return root


@pytest.fixture
def tmp_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for fresh, mutable image folders under `tmp_path` (see module doc)."""
    counter = itertools.count()

    def make(**kwargs: Any) -> Path:
        options: dict[str, Any] = {"num_classes": 2, "per_class": 3, "size": (96, 128)}
        options.update(kwargs)
        return make_dataset(tmp_path / f"dataset_{next(counter)}", **options)

    return make


@pytest.fixture
def host_transfer() -> Iterator[Callable[..., Any]]:
    """Factory of CPU stand-ins for `CudaTransfer` (see module doc)."""
    from standin import HostTransfer

    made: list[HostTransfer] = []

    def make(delay: float = 0.0) -> HostTransfer:
        made.append(HostTransfer(delay))
        return made[-1]

    yield make
    for transfer in made:
        transfer.side.shutdown()
