"""The bench's photo set: real photographs, ImageNet-sized crops, deterministic, packaged."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from augsvc.bench.photos import LONG_SIDE, SOURCES, make_photo_set, repeat_manifest
from augsvc.engine.dataset import open_dataset


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*.jpg"))}


def test_sources_are_the_licensed_photographs() -> None:
    names = sorted(p.stem for p in SOURCES.glob("*.jpg"))
    assert names == ["astronaut", "chelsea", "coffee", "ihc", "retina", "rocket"]
    licence = (SOURCES / "LICENSE.md").read_text()
    assert all(f"{name}.jpg" in licence for name in names)


def test_photo_set_is_deterministic_and_imagenet_sized(tmp_path: Path) -> None:
    a = make_photo_set(tmp_path / "a", num_images=24, num_classes=4, seed=3)
    b = make_photo_set(tmp_path / "b", num_images=24, num_classes=4, seed=3)
    c = make_photo_set(tmp_path / "c", num_images=24, num_classes=4, seed=4)
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)
    assert len(_digests(a)) == 24
    for path in a.glob("*/*.jpg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert LONG_SIDE[0] <= max(im.size) <= LONG_SIDE[1]
            assert min(im.size) >= max(im.size) * 0.5  # a crop of aspect ratio 3/4..4/3
        assert 5_000 < path.stat().st_size < 200_000


def test_repeat_manifest_lists_the_set_as_one_dataset(tmp_path: Path) -> None:
    root = make_photo_set(tmp_path / "set", num_images=10, num_classes=5)
    manifest = repeat_manifest(root, epoch_images=25)
    index = open_dataset(manifest)
    assert len(index) == 30  # 3 repeats of 10 cover 25
    assert len(index.classes) == 5 and sorted(set(index.labels.tolist())) == [0, 1, 2, 3, 4]
