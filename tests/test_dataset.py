"""The dataset catalog: header sizes, layouts, labels, the index cache, corrupt files."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from augsvc.engine.dataset import (
    FOLDER_CACHE_NAME,
    DatasetError,
    check_encoded,
    image_size,
    open_dataset,
)


def _noise(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb.convert(mode) if mode != "RGB" else rgb


def _jpeg_bytes(h: int = 48, w: int = 64, **save: object) -> bytes:
    buf = io.BytesIO()
    _noise(h, w).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _decoded_size(path: Path) -> tuple[int, int]:
    """(height, width) as Pillow decodes it, EXIF orientation applied."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.height, im.width


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = "x" * 3000  # ImageDescription: makes APP1 bigger than one read
    return exif


JPEG_CASES = {
    "baseline_1x1": (1, 1, "RGB", {}),
    "baseline_odd": (17, 33, "RGB", {}),
    "baseline_500x375": (375, 500, "RGB", {"quality": 90}),
    "portrait": (500, 375, "RGB", {}),
    "progressive": (240, 320, "RGB", {"progressive": True}),
    "optimized_444": (99, 101, "RGB", {"optimize": True, "subsampling": 0}),
    "grayscale": (50, 70, "L", {}),
    "cmyk": (30, 40, "CMYK", {}),
    "icc_100k": (64, 48, "RGB", {"icc_profile": bytes(range(256)) * 400}),  # many APP2s
    **{f"exif_orientation_{o}": (40, 64, "RGB", {"exif": _exif(o)}) for o in range(1, 9)},
}


@pytest.mark.parametrize("case", list(JPEG_CASES))
def test_jpeg_header_size_matches_decoded(tmp_path: Path, case: str) -> None:
    h, w, mode, save = JPEG_CASES[case]
    path = tmp_path / "a.jpg"
    _noise(h, w, mode).save(path, **save)
    assert image_size(path) == _decoded_size(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "1"])
@pytest.mark.parametrize("size", [(1, 1), (31, 257), (375, 500)])
def test_png_header_size_matches_decoded(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    path = tmp_path / "a.png"
    _noise(*size).convert(mode).save(path)
    assert image_size(path) == _decoded_size(path) == size


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF"])
def test_other_formats_via_pillow(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"a.{fmt.lower()}"
    _noise(21, 34).save(path, format=fmt)
    assert image_size(path) == (21, 34)
    assert check_encoded(path.read_bytes()) is None


def test_exif_orientation_matches_dali_decoder(tmp_path: Path) -> None:
    """heights/widths must be what DALI's decoder outputs (adjust_orientation=True)."""
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    paths = []
    for o in (1, 6, 8):
        paths.append(tmp_path / f"o{o}.jpg")
        _noise(40, 64).save(paths[-1], exif=_exif(o))

    @dali.pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def decode():  # type: ignore[no-untyped-def]
        data = fn.external_source(
            source=lambda: [np.fromfile(p, np.uint8) for p in paths], batch=True
        )
        return fn.decoders.image(data, device="cpu")

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    assert [tuple(np.array(out[i]).shape[:2]) for i in range(len(paths))] == [
        image_size(p) for p in paths
    ] == [(40, 64), (64, 40), (64, 40)]


# ---------------------------------------------------------------- layouts


def test_folder_layout(tmp_path: Path, jpeg_folder: Path) -> None:
    index = open_dataset(jpeg_folder)
    assert index.classes == ("class_00", "class_01", "class_02")
    assert len(index) == 12 and index.rejected == ()
    assert index.labels.dtype == np.int64 and index.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert index.heights.dtype == np.int32 and index.widths.dtype == np.int32
    assert all(os.path.isabs(p) for p in index.paths)
    for path, h, w in zip(index.paths, index.heights, index.widths, strict=True):
        assert _decoded_size(Path(path)) == (h, w)
    assert (index.heights > index.widths).sum() == 2  # the synth portraits
    assert index.read(3) == Path(index.paths[3]).read_bytes()
    assert index.root == jpeg_folder and index.manifest is None
    assert not index.labels.flags.writeable


def test_folder_skips_hidden_root_files_and_cache(tmp_dataset) -> None:
    root = tmp_dataset()
    (root / "README.txt").write_text("not a class")
    (root / ".hidden_class").mkdir()
    _noise(8, 8).save(root / ".hidden_class" / "x.jpg")
    _noise(8, 8).save(root / "class_00" / ".x.jpg")
    (root / "class_01" / "nested").mkdir()
    _noise(9, 7).save(root / "class_01" / "nested" / "deep.png")
    index = open_dataset(root)
    assert index.classes == ("class_00", "class_01")
    assert len(index) == 7 and index.rejected == ()
    deep = index.paths.index(str(root / "class_01" / "nested" / "deep.png"))
    assert index.labels[deep] == 1 and (index.heights[deep], index.widths[deep]) == (9, 7)
    assert (root / FOLDER_CACHE_NAME).is_file()
    assert len(open_dataset(root)) == 7  # the cache file is not indexed either


def test_folder_with_fixed_classes(tmp_dataset) -> None:
    root = tmp_dataset()
    index = open_dataset(root, classes=["zebra", "class_01", "class_00"])
    assert index.classes == ("zebra", "class_01", "class_00")
    assert sorted(set(index.labels.tolist())) == [1, 2]
    with pytest.raises(DatasetError, match="'class_00' is not a known class"):
        open_dataset(root, classes=["class_01"])


def _manifest(path: Path, rows: list[str], header: str = "path,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_manifest_integer_labels(tmp_dataset, tmp_path: Path) -> None:
    root = tmp_dataset()
    absolute = root / "class_01" / "img_0000.jpg"
    manifest = _manifest(root / "train.csv", [
        "class_00/img_0000.jpg,3",
        f"{absolute},0",
        "",  # blank lines are fine
        "class_00/img_0001.jpg,3",
    ])
    index = open_dataset(manifest)
    assert index.paths == (str(root / "class_00" / "img_0000.jpg"), str(absolute),
                           str(root / "class_00" / "img_0001.jpg"))
    assert index.labels.tolist() == [3, 0, 3]
    assert index.classes == ("0", "1", "2", "3")
    assert index.manifest == manifest and index.root == root
    assert manifest.with_name("train.csv.augsvc-index.json").is_file()


def test_manifest_class_names_extra_columns_and_missing_files(tmp_dataset) -> None:
    root = tmp_dataset()
    manifest = _manifest(root / "m.csv", [
        "7,class_01/img_0000.jpg,dog",
        "8,class_00/img_0000.jpg,cat",
        "9,class_00/missing.jpg,cat",
        '10,"class_00/img_0002.jpg",dog',
    ], header="id,Path,label")
    index = open_dataset(manifest)
    assert index.classes == ("cat", "dog")
    assert index.labels.tolist() == [1, 0, 1]
    assert len(index.rejected) == 1
    assert index.rejected[0][0] == str(root / "class_00" / "missing.jpg")
    assert "No such file" in index.rejected[0][1]
    fixed = open_dataset(manifest, classes=("bird", "dog", "cat"))
    assert fixed.labels.tolist() == [1, 2, 1]
    with pytest.raises(DatasetError, match=r"m\.csv line 3: unknown class 'cat'"):
        open_dataset(manifest, classes=("dog",))


@pytest.mark.parametrize(("rows", "header", "message"), [
    (["a.jpg,0"], "file,label", r"line 1: expected a header with 'path' and 'label'"),
    (["a.jpg,0", "b.jpg"], "path,label", r"line 3: expected a path and a label"),
    (["a.jpg,0", ",1"], "path,label", r"line 3: expected a path and a label"),
    (["a.jpg,0", "b.jpg,-1"], "path,label", r"line 3: negative label -1"),
    ([], "path,label", r"lists no images"),
])
def test_manifest_errors_name_the_line(
    tmp_path: Path, rows: list[str], header: str, message: str
) -> None:
    with pytest.raises(DatasetError, match=message):
        open_dataset(_manifest(tmp_path / "m.csv", rows, header))


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class folders"):
        open_dataset(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        open_dataset(tmp_path)
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"no usable images .* 1 file\(s\) rejected"):
        open_dataset(tmp_path)
    assert isinstance(DatasetError("x"), ValueError)


# ---------------------------------------------------------------- cache


def test_cache_reused_then_refreshed(tmp_dataset) -> None:
    root = tmp_dataset()
    cache = root / FOLDER_CACHE_NAME
    first = open_dataset(root)
    assert first.parsed == 6 and cache.is_file()
    stamp = cache.stat().st_mtime_ns

    again = open_dataset(root)
    assert again.parsed == 0 and cache.stat().st_mtime_ns == stamp
    assert again.paths == first.paths
    assert np.array_equal(again.heights, first.heights)

    # modify one file: only it is re-parsed, and the new size is seen
    target = root / "class_00" / "img_0001.jpg"
    _noise(20, 30).save(target)
    changed = open_dataset(root)
    i = changed.paths.index(str(target))
    assert changed.parsed == 1 and (changed.heights[i], changed.widths[i]) == (20, 30)
    assert open_dataset(root).parsed == 0

    # add one, remove one
    _noise(11, 12).save(root / "class_01" / "new.jpg")
    added = open_dataset(root)
    assert added.parsed == 1 and len(added) == 7
    (root / "class_00" / "img_0000.jpg").unlink()
    stamp = cache.stat().st_mtime_ns
    removed = open_dataset(root)
    assert removed.parsed == 0 and len(removed) == 6
    assert cache.stat().st_mtime_ns != stamp
    assert "class_00/img_0000.jpg" not in json.loads(cache.read_text())["keys"]


def test_cache_disabled_and_invalid_cache(tmp_dataset, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_dataset()
    assert open_dataset(root, cache=False).parsed == 6
    assert not (root / FOLDER_CACHE_NAME).exists()
    (root / FOLDER_CACHE_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="augsvc.engine.dataset"):
        assert open_dataset(root).parsed == 6
    assert "ignoring invalid index cache" in caplog.text
    assert open_dataset(root).parsed == 0


def test_cache_falls_back_to_user_cache(
    tmp_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the folder is not writable the cache goes under $XDG_CACHE_HOME/augsvc/index."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_dataset()
    (root / FOLDER_CACHE_NAME).mkdir()  # the cache path cannot be written as a file
    assert open_dataset(root).parsed == 6
    cached = list((tmp_path / "xdg" / "augsvc" / "index").glob("*.json"))
    assert len(cached) == 1
    assert open_dataset(root).parsed == 0


# ---------------------------------------------------------------- corrupt files


def test_corrupt_files_are_rejected_not_fatal(
    tmp_dataset, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_dataset()
    bad = root / "class_00"
    rng = np.random.default_rng(1)
    (bad / "random.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("hello")
    (bad / "head_cut.jpg").write_bytes(_jpeg_bytes()[:100])  # cut inside the headers
    (bad / "anim.gif").write_bytes(_gif_bytes())
    (bad / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    body_cut = _jpeg_bytes(200, 200)
    (bad / "body_cut.jpg").write_bytes(body_cut[: len(body_cut) // 2])  # header intact
    os.symlink(root / "nowhere.jpg", bad / "dangling.jpg")

    with caplog.at_level(logging.WARNING, logger="augsvc.engine.dataset"):
        index = open_dataset(root)
    reasons = {Path(p).name: r for p, r in index.rejected}
    assert set(reasons) == {"random.jpg", "empty.jpg", "notes.txt", "head_cut.jpg",
                            "anim.gif", "bad.png", "dangling.jpg"}
    assert reasons["notes.txt"] == reasons["empty.jpg"] == "not an image"
    assert "truncated JPEG header" in reasons["head_cut.jpg"]
    assert "unsupported image format GIF" in reasons["anim.gif"]
    assert "IHDR" in reasons["bad.png"]
    assert "cannot stat" in reasons["dangling.jpg"]
    for path, _ in index.rejected:
        assert path in caplog.text
    # the body-truncated JPEG passes indexing; check_encoded catches it at read time
    cut = index.paths.index(str(bad / "body_cut.jpg"))
    assert "no EOI" in check_encoded(index.read(cut))
    assert len(index) == 7
    assert open_dataset(root).rejected == index.rejected  # same answer from the cache


def _gif_bytes() -> bytes:
    buf = io.BytesIO()
    _noise(8, 8).save(buf, format="GIF")
    return buf.getvalue()


def test_check_encoded() -> None:
    jpeg = _jpeg_bytes()
    progressive = _jpeg_bytes(progressive=True)
    png = io.BytesIO()
    _noise(20, 20).save(png, format="PNG")
    png_bytes = png.getvalue()
    assert check_encoded(jpeg) is None
    assert check_encoded(progressive) is None
    assert check_encoded(jpeg + b"trailer after EOI" * 100) is None
    assert check_encoded(png_bytes) is None
    assert check_encoded(b"") == "empty file"
    assert "unknown signature" in check_encoded(b"GIF89a" + bytes(100))
    assert "unknown signature" in check_encoded(jpeg[2:])  # no SOI
    assert "no EOI" in check_encoded(jpeg[:-2])
    assert "no EOI" in check_encoded(progressive[: len(progressive) * 3 // 4])
    assert "truncated JPEG header" in check_encoded(jpeg[:150])
    assert "no SOF" in check_encoded(b"\xff\xd8\xff\xda\x00\x02" + bytes(50) + b"\xff\xd9")
    assert "no IEND" in check_encoded(png_bytes[:-12])
    assert "IHDR" in check_encoded(png_bytes[:20])
