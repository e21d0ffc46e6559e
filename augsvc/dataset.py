"""Dataset catalog: image folders and CSV manifests, indexed with labels and image sizes.

Layouts accepted by `open_dataset`:

* **image folder** `root/<class>/<image>`: classes are the sorted names of the
  non-hidden subfolders, labels their indices (torchvision's ImageFolder order);
  images may sit in nested folders below their class folder; files directly
  under `root` (stats, README) are ignored.
* **CSV manifest** with a header naming `path` and `label` columns (others are
  ignored): relative paths resolve against the manifest's folder; labels are all
  non-negative integers, or class names (classes = the sorted distinct names).
  Pass `classes=` (e.g. the training folder's) to map names onto a fixed list.

Image sizes come from the file header only (JPEG SOF marker, PNG IHDR; Pillow's
lazy open for the other formats DALI decodes). They are the sizes as decoded,
i.e. after the JPEG EXIF orientation is applied, as DALI's decoder does by default
(`adjust_orientation=True`) and as `PIL.ImageOps.exif_transpose` does.

Corrupt-file policy (never a crash for a bad file):

1. At index time, a file that cannot be read, is not an image in a format DALI
   decodes, or whose header cannot be parsed is excluded from the index and listed
   in `DatasetIndex.rejected` as (path, reason); each is logged with its path
   (logger `augsvc.dataset`, WARNING).
2. A file that passes indexing can still be broken further in (e.g. a truncated
   JPEG keeps its header). When a batch is read, the pipeline screens the bytes
   with `check_encoded` and drops files that fail it or fail to decode from their
   batch; the batch's result reports them (sample id, path, reason).

The index is cached as JSON beside the dataset (`<root>/.augsvc-index.json`, or
`<manifest>.augsvc-index.json`; under `~/.cache/augsvc/index/` when that folder is
read-only). Each open walks the files once (`os.scandir` + stat) and re-parses only
the headers of files that are new or whose size or mtime_ns changed; the cache is
rewritten only when something changed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["DatasetError", "DatasetIndex", "check_encoded", "image_size", "open_dataset"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "augsvc-index/1"
FOLDER_CACHE_NAME = ".augsvc-index.json"
MANIFEST_CACHE_SUFFIX = ".augsvc-index.json"
MAX_LOGGED_REJECTS = 20

JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# start-of-frame markers: every 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length
_EXIF_ORIENTATION = 0x0112
# formats Pillow may identify that DALI's decoder also reads
_OTHER_FORMATS = frozenset(["TIFF", "BMP", "WEBP", "JPEG2000", "PPM"])


class DatasetError(ValueError):
    """A dataset path, layout or manifest that cannot be indexed."""


class HeaderError(ValueError):
    """An image header that cannot be parsed."""


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    """Every usable image of a dataset: absolute path, label, decoded height and width."""

    root: Path  # the image folder, or the folder manifest paths are relative to
    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int32
    widths: np.ndarray  # (N,) int32
    classes: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...] = ()  # (path, reason), excluded from the index
    manifest: Path | None = None  # the CSV manifest, when the dataset is one
    parsed: int = field(default=0, compare=False)  # headers parsed here (0: all cached)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def source(self) -> Path:
        """The path the dataset was opened from (manifest or folder)."""
        return self.manifest if self.manifest is not None else self.root

    def read(self, i: int) -> bytes:
        """The encoded bytes of image `i`."""
        with open(self.paths[i], "rb") as f:
            return f.read()


def open_dataset(
    path: str | os.PathLike[str],
    *,
    cache: bool = True,
    classes: Sequence[str] | None = None,
) -> DatasetIndex:
    """Index an image folder or CSV manifest (module docstring); use and refresh the cache.

    `classes` fixes the class list (labels are indices into it); a folder or manifest
    class name not in it is a DatasetError. Raises DatasetError for a missing path,
    a bad manifest row or an empty dataset.
    """
    src = Path(os.path.abspath(os.fspath(path)))
    if not src.exists():
        raise DatasetError(f"no such dataset: {src}")
    fixed = tuple(classes) if classes is not None else None
    if src.is_dir():
        root, manifest = src, None
        found, rows, bad = _scan_folder(src, fixed)
        names = fixed if fixed is not None else found
        cache_path = src / FOLDER_CACHE_NAME
    else:
        root, manifest = src.parent, src
        names, rows, bad = _read_manifest(src, fixed)
        cache_path = src.with_name(src.name + MANIFEST_CACHE_SUFFIX)

    cached = _load_cache(cache_path, src) if cache else {}
    entries: dict[str, list] = {}
    parsed = 0
    paths, labels, heights, widths = [], [], [], []
    rejected = list(bad)
    for key, abspath, label, size, mtime in rows:
        entry = entries.get(key) or cached.get(key)  # a manifest may list a file twice
        if entry is None or entry[0] != size or entry[1] != mtime:
            entry = [size, mtime, *_header_entry(abspath)]
            parsed += 1
        entries[key] = entry
        if entry[4] is not None:
            rejected.append((abspath, entry[4]))
        else:
            paths.append(abspath)
            labels.append(label)
            heights.append(entry[2])
            widths.append(entry[3])
    if cache and (parsed or entries.keys() != cached.keys()):
        _save_cache(cache_path, src, entries)
    _log_rejected(src, rejected)
    if not paths:
        detail = f"; {len(rejected)} file(s) rejected, e.g. {rejected[0]}" if rejected else ""
        raise DatasetError(f"no usable images in {src}{detail}")
    return DatasetIndex(
        root=root,
        paths=tuple(paths),
        labels=_frozen(np.array(labels, dtype=np.int64)),
        heights=_frozen(np.array(heights, dtype=np.int32)),
        widths=_frozen(np.array(widths, dtype=np.int32)),
        classes=tuple(names),
        rejected=tuple(rejected),
        manifest=manifest,
        parsed=parsed,
    )


# (cache key, absolute path, label, size, mtime_ns)
_Row = tuple[str, str, int, int, int]


def _scan_folder(
    root: Path, fixed: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[_Row], list[tuple[str, str]]]:
    """(classes found, rows, files that could not be stat'ed) of an image folder."""
    with os.scandir(root) as it:
        found = tuple(sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir()))
    if not found:
        raise DatasetError(f"no class folders in {root}; expected {root}/<class>/<image> "
                           "or a CSV manifest")
    if fixed is not None:
        unknown = [c for c in found if c not in fixed]
        if unknown:
            raise DatasetError(f"{root}: class folder {unknown[0]!r} is not a known class; "
                               f"known: {', '.join(fixed)}")
    label_of = {name: i for i, name in enumerate(fixed if fixed is not None else found)}
    rows: list[_Row] = []
    bad: list[tuple[str, str]] = []
    prefix = len(os.path.join(root, ""))
    for name in found:
        stack = [os.path.join(root, name)]
        class_rows: list[_Row] = []
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        if e.is_dir():
                            stack.append(e.path)
                            continue
                        st = e.stat()
                    except OSError as exc:
                        bad.append((e.path, f"cannot stat: {exc.strerror or exc}"))
                        continue
                    key = e.path[prefix:]
                    class_rows.append((key, e.path, label_of[name], st.st_size, st.st_mtime_ns))
        if not class_rows:
            log.warning("%s: class folder %r has no files", root, name)
        rows.extend(sorted(class_rows))
    return found, rows, bad


def _read_manifest(
    manifest: Path, fixed: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[_Row], list[tuple[str, str]]]:
    """(classes, rows, missing files) of a CSV manifest; DatasetError names the bad line."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read manifest {manifest}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise DatasetError(f"{manifest} line 1: expected a header with 'path' and 'label' "
                           f"columns, got {','.join(header)!r}")
    ip, il = header.index("path"), header.index("label")
    records: list[tuple[int, str, str]] = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        line = reader.line_num
        if len(row) <= max(ip, il) or not row[ip].strip() or not row[il].strip():
            raise DatasetError(f"{manifest} line {line}: expected a path and a label, got "
                               f"{','.join(row)!r}")
        records.append((line, row[ip].strip(), row[il].strip()))
    if not records:
        raise DatasetError(f"{manifest}: the manifest lists no images")
    names, labels = _manifest_labels(manifest, records, fixed)

    rows: list[_Row] = []
    bad: list[tuple[str, str]] = []
    base = manifest.parent
    for (_, rel, _), label in zip(records, labels, strict=True):
        abspath = os.path.normpath(os.path.join(base, rel))
        try:
            st = os.stat(abspath)
        except OSError as exc:
            bad.append((abspath, f"cannot stat: {exc.strerror or exc}"))
            continue
        rows.append((rel, abspath, label, st.st_size, st.st_mtime_ns))
    return names, rows, bad


def _manifest_labels(
    manifest: Path, records: list[tuple[int, str, str]], fixed: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[int]]:
    """Class names and integer labels from manifest label cells."""
    cells = [label for _, _, label in records]
    if fixed is not None:
        index = {name: i for i, name in enumerate(fixed)}
        labels = []
        for line, _, cell in records:
            if cell in index:
                labels.append(index[cell])
            elif cell.isdigit() and int(cell) < len(fixed):
                labels.append(int(cell))
            else:
                raise DatasetError(f"{manifest} line {line}: unknown class {cell!r}; "
                                   f"known: {', '.join(fixed)}")
        return fixed, labels
    if all(_is_int(c) for c in cells):
        for line, _, cell in records:
            if int(cell) < 0:
                raise DatasetError(f"{manifest} line {line}: negative label {cell}")
        labels = [int(c) for c in cells]
        return tuple(str(i) for i in range(max(labels) + 1)), labels
    names = tuple(sorted(set(cells)))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[c] for c in cells]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- headers


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of an image as decoded (EXIF orientation applied), from its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(JPEG_SOI):
            h, w, orientation, _ = _jpeg_header(f, to_scan=False)
            return (w, h) if orientation >= 5 else (h, w)
        if head == PNG_SIGNATURE:
            return _png_header(f)
    return _pillow_size(path)


def _header_entry(path: str) -> list:
    """[height, width, None] or [0, 0, reason] for the cache."""
    try:
        h, w = image_size(path)
    except HeaderError as exc:
        return [0, 0, str(exc)]
    except OSError as exc:
        return [0, 0, f"unreadable: {exc.strerror or exc}"]
    return [h, w, None]


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise HeaderError("truncated JPEG header")
    return data


def _jpeg_header(f: BinaryIO, *, to_scan: bool) -> tuple[int, int, int, int]:
    """(height, width, EXIF orientation, offset of the first scan's data) of a JPEG.

    Walks the marker segments from SOI; stops at the frame header (SOF) unless
    `to_scan`, in which case it goes on to the first SOS (offset -1 when it stopped
    at SOF).
    """
    if f.read(2) != JPEG_SOI:
        raise HeaderError("not a JPEG (no SOI marker)")
    orientation, size = 1, None
    while True:
        if _read_exact(f, 1) != b"\xff":
            raise HeaderError(f"bad JPEG marker at byte {f.tell() - 1}")
        marker = 0xFF
        while marker == 0xFF:  # fill bytes
            marker = _read_exact(f, 1)[0]
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise HeaderError("JPEG ends before any image data (EOI)")
        (length,) = struct.unpack(">H", _read_exact(f, 2))
        if length < 2:
            raise HeaderError(f"bad JPEG segment length {length}")
        if marker == 0xDA:
            if size is None:
                raise HeaderError("JPEG scan before any frame header (no SOF)")
            _read_exact(f, length - 2)
            return (*size, orientation, f.tell())
        if marker in _JPEG_SOF:
            if length < 8:
                raise HeaderError(f"bad JPEG frame header length {length}")
            _, h, w = struct.unpack(">BHH", _read_exact(f, 5))
            if h == 0 or w == 0:
                raise HeaderError(f"JPEG frame header with size {w}x{h} (DNL not supported)")
            if not to_scan:
                return h, w, orientation, -1
            size = (h, w)
            f.seek(length - 7, os.SEEK_CUR)
        elif marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(_read_exact(f, length - 2))
        else:
            f.seek(length - 2, os.SEEK_CUR)


def _exif_orientation(app1: bytes) -> int:
    """The orientation tag (1-8) of an APP1 payload, or 1 if absent or malformed."""
    if not app1.startswith(b"Exif\0\0"):
        return 1
    tiff = app1[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, typ, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == _EXIF_ORIENTATION:
                return value if typ == 3 and 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1


def _png_header(f: BinaryIO) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    data = f.read(24)
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise HeaderError("bad PNG header (no IHDR chunk)")
    w, h = struct.unpack(">II", data[16:24])
    if h == 0 or w == 0:
        raise HeaderError(f"PNG with size {w}x{h}")
    return h, w


def _pillow_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of another format via Pillow's lazy open (no pixel decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError as exc:
        raise HeaderError("not an image") from exc
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise HeaderError(f"bad image header: {exc}") from exc
    if fmt not in _OTHER_FORMATS:
        raise HeaderError(f"unsupported image format {fmt}")
    return h, w


def check_encoded(data: bytes) -> str | None:
    """Why `data` is obviously not a decodable image, or None if it looks plausible.

    Flags: empty data; an unknown signature (JPEG, PNG and the other formats DALI
    decodes are known); a JPEG whose headers are broken or truncated, or with no EOI
    marker after its scan data (truncated; trailers after EOI are allowed); a PNG with
    a bad IHDR or no IEND chunk near the end. Cheap: headers plus one backward search.
    """
    if not data:
        return "empty file"
    if data.startswith(JPEG_SOI):
        try:
            _, _, _, scan = _jpeg_header(io.BytesIO(data), to_scan=True)
        except HeaderError as exc:
            return str(exc)
        if data.rfind(b"\xff\xd9", scan) < 0:
            return "truncated JPEG (no EOI marker after the scan data)"
        return None
    if data.startswith(PNG_SIGNATURE):
        try:
            _png_header(io.BytesIO(data))
        except HeaderError as exc:
            return str(exc)
        if data.rfind(b"IEND", max(0, len(data) - 4096)) < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if _other_signature(data):
        return None
    return f"not an image (unknown signature {data[:8].hex()})"


def _other_signature(data: bytes) -> bool:
    """Whether `data` starts like a TIFF, BMP, WebP, JPEG 2000 or PNM file."""
    return (
        data[:4] in (b"II*\0", b"MM\0*")
        or data[:2] == b"BM"
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        or data[:12] == b"\0\0\0\x0cjP  \r\n\x87\n"
        or data[:4] == b"\xff\x4f\xff\x51"
        or (data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6")
            and data[2:3].isspace())
    )


# ---------------------------------------------------------------- cache


def _cache_candidates(primary: Path, src: Path) -> list[Path]:
    """The cache beside the dataset, then the per-user fallback for read-only folders."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(os.fsencode(src)).hexdigest()[:24]
    return [primary, base / "augsvc" / "index" / f"{digest}.json"]


def _load_cache(primary: Path, src: Path) -> dict[str, list]:
    """key -> [size, mtime_ns, height, width, reason or None]; {} if none is usable.

    Of the two candidate locations the newer file wins (a read-only folder may hold a
    stale cache while the fresh one lives under ~/.cache).
    """
    found = [p for p in _cache_candidates(primary, src) if p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            cols = [data[k] for k in ("keys", "size", "mtime_ns", "height", "width", "error")]
            return {k: list(v) for k, *v in zip(*cols, strict=True)}
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring invalid index cache %s: %s", path, exc)
    return {}


def _save_cache(primary: Path, src: Path, entries: dict[str, list]) -> None:
    """Write the cache atomically beside the dataset, else under ~/.cache; warn if neither."""
    data: dict[str, object] = {"format": CACHE_FORMAT, "dataset": str(src), "keys": list(entries)}
    for i, name in enumerate(("size", "mtime_ns", "height", "width", "error")):
        data[name] = [entry[i] for entry in entries.values()]
    text = json.dumps(data, separators=(",", ":"))
    for path in _cache_candidates(primary, src):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            return
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    log.warning("could not write the index cache for %s", src)


def _log_rejected(src: Path, rejected: list[tuple[str, str]]) -> None:
    if not rejected:
        return
    log.warning("%s: %d file(s) rejected and excluded from the index", src, len(rejected))
    for path, reason in rejected[:MAX_LOGGED_REJECTS]:
        log.warning("  rejected %s: %s", path, reason)
    if len(rejected) > MAX_LOGGED_REJECTS:
        log.warning("  ... and %d more", len(rejected) - MAX_LOGGED_REJECTS)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
