"""The engine end to end in-process: determinism across batch sizes, corrupt images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from augsvc.core.sampling import EpochPlan
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import IMAGENET
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import open_dataset
from augsvc.engine.synth import make_dataset

SPEC = AugmentSpec(size=(64, 64), p_vflip=0.3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("engine"), num_classes=4, per_class=16,
                        size=(120, 160))


def test_same_sample_same_bytes_in_batches_of_1_7_64(folder: Path) -> None:
    index = open_dataset(folder)
    engine = Augmenter(index, SPEC, IMAGENET, max_batch_size=64)
    plan = EpochPlan(len(index), 64, seed=11, epoch=3)
    whole = engine.run_batch(11, 3, plan.batch(0))
    assert whole.images.shape == (64, 64, 64, 3) and not whole.dropped
    np.testing.assert_array_equal(whole.labels, index.labels[whole.sample_ids])
    for size in (1, 7):
        for start in (0, 64 - size):
            ids = whole.sample_ids[start:start + size]
            part = engine.run(11, 3, ids, ids)
            np.testing.assert_array_equal(part.images, whole.images[start:start + size])
    other_epoch = engine.run(11, 4, whole.sample_ids[:7], whole.sample_ids[:7])
    assert not np.array_equal(other_epoch.images, whole.images[:7])
    engine.close()


def test_corrupt_images_are_dropped_and_reported(folder: Path, tmp_path: Path) -> None:
    index = open_dataset(folder)
    data = Path(index.paths[0]).read_bytes()
    bad = tmp_path / "bad"
    (bad / "c").mkdir(parents=True)
    (bad / "c" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    # segment structure intact (the cheap byte screen passes it) but a bogus Huffman table:
    # the decoder refuses the file and DALI rejects the whole batch
    bogus = bytearray(data)
    dht = data.index(b"\xff\xc4")
    bogus[dht + 5 : dht + 21] = b"\xff" * 16
    (bad / "c" / "bad_huffman.jpg").write_bytes(bytes(bogus))
    (bad / "c" / "ok.jpg").write_bytes(data)
    bad_index = open_dataset(bad)
    assert len(bad_index) == 3  # headers parse: they are only found broken when read
    engine = Augmenter(bad_index, SPEC, IMAGENET, max_batch_size=3)
    out = engine.run(0, 0, [0, 1, 2], [0, 1, 2])
    names = {Path(d.path).name: d.reason for d in out.dropped}
    assert set(names) == {"truncated.jpg", "bad_huffman.jpg"}, names
    assert "truncated" in names["truncated.jpg"]
    assert "decode failed" in names["bad_huffman.jpg"]
    ok = bad_index.paths.index(str(bad / "c" / "ok.jpg"))
    assert out.sample_ids.tolist() == [ok] and out.images.shape == (1, 64, 64, 3)
    alone = engine.run(0, 0, [ok], [ok])
    np.testing.assert_array_equal(alone.images, out.images)
    empty = engine.run(0, 0, [bad_index.paths.index(str(bad / "c" / "truncated.jpg"))], [0])
    assert empty.images.shape == (0, 64, 64, 3) and len(empty.dropped) == 1
    engine.close()
