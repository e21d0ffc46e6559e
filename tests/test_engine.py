"""The engine end to end in-process: determinism across batch sizes, corrupt images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from augsvc.core.sampling import SUBSTITUTE_ATTEMPTS, EpochPlan, substitutes
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


def _corrupt_folder(folder: Path, root: Path) -> tuple[Path, dict[str, int]]:
    """A folder of class "c": truncated.jpg, bad_huffman.jpg and ok.jpg; name -> index."""
    data = Path(open_dataset(folder).paths[0]).read_bytes()
    (root / "c").mkdir(parents=True)
    (root / "c" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    # segment structure intact (the cheap byte screen passes it) but a bogus Huffman table:
    # the decoder refuses the file and DALI rejects the whole batch
    bogus = bytearray(data)
    dht = data.index(b"\xff\xc4")
    bogus[dht + 5 : dht + 21] = b"\xff" * 16
    (root / "c" / "bad_huffman.jpg").write_bytes(bytes(bogus))
    (root / "c" / "ok.jpg").write_bytes(data)
    index = open_dataset(root)
    assert len(index) == 3  # headers parse: they are only found broken when read
    return root, {Path(p).name: i for i, p in enumerate(index.paths)}


def test_corrupt_images_are_dropped_and_reported(folder: Path, tmp_path: Path) -> None:
    bad, ids = _corrupt_folder(folder, tmp_path / "bad")
    bad_index = open_dataset(bad)
    engine = Augmenter(bad_index, SPEC.replace(corrupt="drop"), IMAGENET, max_batch_size=3)
    out = engine.run(0, 0, [0, 1, 2], [0, 1, 2])
    names = {Path(d.path).name: d.reason for d in out.dropped}
    assert set(names) == {"truncated.jpg", "bad_huffman.jpg"}, names
    assert "truncated" in names["truncated.jpg"]
    assert "decode failed" in names["bad_huffman.jpg"]
    ok = ids["ok.jpg"]
    assert out.sample_ids.tolist() == [ok] and out.images.shape == (1, 64, 64, 3)
    assert out.substituted == ()
    alone = engine.run(0, 0, [ok], [ok])
    np.testing.assert_array_equal(alone.images, out.images)
    empty = engine.run(0, 0, [ids["truncated.jpg"]], [0])
    assert empty.images.shape == (0, 64, 64, 3) and len(empty.dropped) == 1
    engine.close()


def test_corrupt_images_are_substituted_deterministically(folder: Path, tmp_path: Path) -> None:
    """A truncated and an undecodable JPEG keep the batch full: each row goes to the first
    usable of its deterministic substitutes, augmented with the substitute's own draw."""
    bad, ids = _corrupt_folder(folder, tmp_path / "bad")
    index = open_dataset(bad)
    engine = Augmenter(index, SPEC, IMAGENET, max_batch_size=3)
    assert SPEC.corrupt == "substitute"  # the default
    seed, epoch = 4, 1
    rows = [ids["truncated.jpg"], ids["ok.jpg"], ids["bad_huffman.jpg"]]
    draws = [rows[0], rows[1], rows[2] + 3]  # e.g. a second occurrence of bad_huffman
    out = engine.run(seed, epoch, rows, draws)
    assert out.images.shape == (3, 64, 64, 3) and out.dropped == ()
    assert [s.row for s in out.substituted] == [0, 2]
    ok = ids["ok.jpg"]
    for sub, own, draw in zip(out.substituted, (rows[0], rows[2]), (draws[0], draws[2]),
                              strict=True):
        assert (sub.sample_id, Path(sub.path).name) == (own, Path(index.paths[own]).name)
        # only ok.jpg is usable, so the substitute is the first candidate that is ok.jpg
        candidates, cand_draws = substitutes(seed, epoch, draw, len(index))
        first = candidates.tolist().index(ok)
        assert sub.substitute_id == ok == out.sample_ids[sub.row]
        assert out.draw_ids[sub.row] == cand_draws[first] < 0
    assert "truncated" in out.substituted[0].reason
    assert "decode failed" in out.substituted[1].reason
    np.testing.assert_array_equal(out.labels, index.labels[out.sample_ids])
    # the substitute is augmented as its own draw: what running it with that draw gives
    for row in (0, 2):
        alone = engine.run(seed, epoch, [ok], [out.draw_ids[row]])
        np.testing.assert_array_equal(alone.images[0], out.images[row])
    assert not np.array_equal(out.images[0], out.images[1])  # not a copy of row 1's draw
    again = engine.run(seed, epoch, rows, draws)
    np.testing.assert_array_equal(again.images, out.images)
    assert again.substituted == out.substituted
    engine.close()


def test_a_row_without_usable_substitutes_is_dropped(folder: Path, tmp_path: Path) -> None:
    bad, _ = _corrupt_folder(folder, tmp_path / "bad")
    ok = bad / "c" / "ok.jpg"
    ok.write_bytes(ok.read_bytes()[:3000])  # truncated too: nothing usable is left
    index = open_dataset(bad)
    engine = Augmenter(index, SPEC, IMAGENET, max_batch_size=3)
    out = engine.run(0, 0, [0, 1, 2], [0, 1, 2])
    assert out.images.shape == (0, 64, 64, 3) and out.substituted == ()
    assert len(out.dropped) == 3
    assert all(f"no usable substitute in {SUBSTITUTE_ATTEMPTS} tries" in d.reason
               for d in out.dropped)
    engine.close()
