"""Dataset statistics by default: spec stats "auto" against a real `augsvc serve`: the
dataset's own statistics when the server has them (beside the dataset or from
`--dataset NAME=PATH,stats=FILE`), else the ImageNet preset with one warning; GetDataset
and every batch header name the source used.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serverproc import REPO_ROOT, ServerProcess, running_server

from augsvc import wire
from augsvc.cli.serve import _datasets
from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET, DatasetStats, load
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import open_dataset
from augsvc.engine.statistics import compute_stats, stats_file
from augsvc.wire._proto import augment_pb2 as pb
from augsvc.wire.convert import spec_to_proto

pytestmark = pytest.mark.timeout(180)

# normalize uses the statistics' mean/std, so the pixels tell which statistics were used
SPEC = AugmentSpec(size=(24, 24), hsv=False, pca=False, normalize=True, dtype="float32")
WARNING = "stats 'auto' (the default) uses the ImageNet preset"


@pytest.fixture(scope="module")
def stats_elsewhere(tmp_path_factory: pytest.TempPathFactory, jpeg_folder: Path) -> Path:
    """Statistics of `jpeg_folder` (read-only here) kept in another folder; mean shifted so
    they differ from the computed ones beside the copy."""
    own = compute_stats(open_dataset(jpeg_folder))
    shifted = DatasetStats.from_moments(own.mean * 0.9, own.cov, own.num_images,
                                        own.num_pixels, "kept elsewhere")
    return shifted.save(tmp_path_factory.mktemp("elsewhere") / "photos-stats.json")


@pytest.fixture(scope="module")
def with_stats(tmp_path_factory: pytest.TempPathFactory, jpeg_folder: Path) -> Path:
    """A copy of `jpeg_folder` with `augsvc stats` output beside it."""
    root = tmp_path_factory.mktemp("own") / "photos"
    shutil.copytree(jpeg_folder, root, ignore=shutil.ignore_patterns(".*"))
    index = open_dataset(root)
    compute_stats(index).save(stats_file(index))
    return root


@pytest.fixture(scope="module")
def server(jpeg_folder: Path, with_stats: Path, stats_elsewhere: Path
           ) -> Iterator[ServerProcess]:
    with running_server({"plain": jpeg_folder, "own": with_stats,
                         "elsewhere": f"{jpeg_folder},stats={stats_elsewhere}"},
                        "--dali-threads", "1") as proc:
        yield proc


def info(server: ServerProcess, name: str, stats: str = "") -> pb.DatasetInfo:
    with grpc.insecure_channel(server.address) as channel:
        return wire.AugmentStub(channel).GetDataset(pb.GetDatasetRequest(name=name, stats=stats),
                                                    timeout=10)


def batch(server: ServerProcess, name: str, spec: AugmentSpec = SPEC) -> wire.AssembledBatch:
    req = pb.StreamBatchesRequest(dataset=name, spec=spec_to_proto(spec), seed=5, batch_size=3,
                                  batches=[0])
    with grpc.insecure_channel(server.address) as channel:
        (got,) = wire.assemble(wire.AugmentStub(channel).StreamBatches(req, timeout=60))
    return got


def engine_batch(folder: Path, stats: DatasetStats) -> np.ndarray:
    index = open_dataset(folder)
    engine = Augmenter(index, SPEC, stats, max_batch_size=3, num_threads=1)
    try:
        return engine.run_batch(5, 0, EpochPlan(len(index), 3, 5, 0).batch(0)).images
    finally:
        engine.close()


def test_auto_is_the_default() -> None:
    assert AugmentSpec().stats == "auto" and AugmentSpec.eval().stats == "auto"


def test_auto_uses_the_preset_without_own_statistics_and_warns_once(
        server: ServerProcess, jpeg_folder: Path) -> None:
    for stats in ("", "auto"):
        assert info(server, "plain", stats).stats.source == "imagenet"
    for _ in range(3):
        got = batch(server, "plain")
        assert got.header.stats_source == "imagenet"
    assert got.array.tobytes() == engine_batch(jpeg_folder, IMAGENET).tobytes()
    warnings = [line for line in server.stderr().splitlines() if WARNING in line]
    assert len(warnings) == 1, warnings
    assert "dataset plain" in warnings[0] and "augsvc stats" in warnings[0]
    assert "stats=FILE" in warnings[0]
    assert batch(server, "plain", SPEC.replace(stats="imagenet")).header.stats_source == (
        "imagenet")


def test_auto_uses_the_statistics_beside_the_dataset(server: ServerProcess,
                                                     with_stats: Path) -> None:
    got = info(server, "own", "auto")
    assert got.stats.source == "dataset" and list(got.stats_sources) == ["imagenet", "dataset"]
    own = compute_stats(open_dataset(with_stats))
    np.testing.assert_allclose(got.stats.mean, own.mean)
    streamed = batch(server, "own")
    assert streamed.header.stats_source == "dataset"
    assert streamed.array.tobytes() == engine_batch(with_stats, own).tobytes()
    assert streamed.array.tobytes() != engine_batch(with_stats, IMAGENET).tobytes()


def test_a_statistics_file_kept_elsewhere(server: ServerProcess, jpeg_folder: Path,
                                          stats_elsewhere: Path) -> None:
    got = info(server, "elsewhere")
    assert got.stats.source == "dataset" and got.stats.description == "kept elsewhere"
    streamed = batch(server, "elsewhere")
    assert streamed.header.stats_source == "dataset"
    assert streamed.array.tobytes() == engine_batch(jpeg_folder, load(stats_elsewhere)).tobytes()
    assert not (jpeg_folder / "augsvc-stats.json").exists()


def test_a_missing_statistics_file_stops_the_server(jpeg_folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    out = subprocess.run(
        [sys.executable, "-m", "augsvc", "serve", "--dataset", f"d={jpeg_folder},stats={missing}",
         "--port", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 2 and f"no statistics file {missing}" in out.stderr


@pytest.mark.parametrize(("items", "datasets", "stats"), [
    (["a=/d/x"], {"a": "/d/x"}, {}),
    (["/d/photos"], {"photos": "/d/photos"}, {}),
    (["a=/d/x,stats=/s/x.json", "b=/d/y"], {"a": "/d/x", "b": "/d/y"}, {"a": "/s/x.json"}),
    (["/d/a,b,stats=s.json"], {"a,b": "/d/a,b"}, {"a,b": "s.json"}),
])
def test_dataset_option_parsing(items: list[str], datasets: dict, stats: dict) -> None:
    got_datasets, got_stats = _datasets(items)
    assert {k: str(v) for k, v in got_datasets.items()} == datasets
    assert {k: str(v) for k, v in got_stats.items()} == stats


@pytest.mark.parametrize("item", ["a=/d/x,stats=", "=/d/x", "a=/d/x,stats=s", "a="])
def test_dataset_option_errors(item: str) -> None:
    items = [item, "a=/other"] if item == "a=/d/x,stats=s" else [item]
    with pytest.raises(ValueError, match="--dataset"):
        _datasets(items)


def test_every_header_carries_the_statistics_digest(server: ServerProcess,
                                                    stats_elsewhere: Path) -> None:
    assert batch(server, "plain").header.stats_digest == IMAGENET.digest
    assert batch(server, "elsewhere").header.stats_digest == load(stats_elsewhere).digest
    assert IMAGENET.digest != load(stats_elsewhere).digest and len(IMAGENET.digest) == 16
    moved = DatasetStats.from_moments(IMAGENET.mean + 1e-12, IMAGENET.cov, 1, 1, "x")
    assert moved.digest != IMAGENET.digest  # any change of a value used changes it


def test_servers_with_different_statistics_fail_the_pass_before_mixing(
        server: ServerProcess, jpeg_folder: Path, stats_elsewhere: Path) -> None:
    """One replica with the dataset's statistics file, one without (the ImageNet preset):
    fancy PCA would differ by server, so the pass fails, naming both; a spec that uses no
    statistics is served by both."""
    from augsvc import AugsvcError
    from augsvc.client import AugmentLoader

    with running_server({"plain": f"{jpeg_folder},stats={stats_elsewhere}"},
                        "--dali-threads", "1") as other:
        servers = [server.address, other.address]
        pca = SPEC.replace(pca=True, normalize=False, dtype="uint8")
        loader = AugmentLoader(servers, "plain", pca, 1, seed=3, streams_per_server=1,
                               batches_per_request=1, return_meta=True)
        with loader, pytest.raises(AugsvcError) as info:
            list(loader)
        error = info.value
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "statistics of dataset 'plain' differ" in str(error)
        assert all(address in str(error) for address in servers)
        assert IMAGENET.digest in str(error) and load(stats_elsewhere).digest in str(error)

        plain = SPEC.replace(pca=False, normalize=False, dtype="uint8")
        with AugmentLoader(servers, "plain", plain, 1, seed=3, streams_per_server=1,
                           batches_per_request=1) as loader:
            got = list(loader)
        assert len(got) == 12
        per_server = loader.stats().servers
        assert len(per_server) == 2 and all(s.images > 0 for s in per_server.values())
