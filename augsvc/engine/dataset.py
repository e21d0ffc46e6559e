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

Untrusted files (the folder may change after indexing and may hold links; see
`augsvc.engine.files`):

* only regular files are indexed and read (a FIFO, a device or a socket is rejected),
  opened with `O_NONBLOCK`, and none larger than `MAX_FILE_BYTES` (64 MiB);
* a link, file or folder, that resolves outside the dataset root (the image folder, or
  the manifest's folder; after resolving every link) is rejected, and so is a manifest
  row outside it, unless the dataset is opened with `allow_outside=True`
  (`augsvc serve --allow-outside-root`); the check is made again on every read, on the
  file actually opened;
* a folder is walked once, identified by (st_dev, st_ino): a directory link to a folder
  already walked (a loop such as `class_a/loop -> ..`, or a second name for a class
  folder) is rejected, not followed;
* a read takes at most the size the index recorded (plus one byte, to notice growth): a
  file whose size changed since indexing is dropped with "changed since indexing";
* what is reported for a file (`DroppedSample.reason`) names the kind of failure only,
  never its content, and the path sent to clients is relative to the dataset root
  (`DatasetIndex.relpath`).

Corrupt-file policy (never a crash for a bad file):

1. At index time, a file that cannot be read, is not an image in a format DALI
   decodes, or whose header cannot be parsed is excluded from the index and listed
   in `DatasetIndex.rejected` as (path, reason), as are the files the rules above
   refuse. Each is logged with its path (logger `augsvc.engine.dataset`) once: at
   WARNING the first time an open finds it, later opens (that know it from the index
   cache) log one summary line and the files at DEBUG.
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

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from augsvc.engine.files import MAX_FILE_BYTES, FileRefused, read_file
from augsvc.engine.headers import check_encoded, header_entry, image_size
from augsvc.engine.index_cache import load_cache, save_cache
from augsvc.engine.listing import DatasetError, read_manifest, scan_folder

__all__ = [
    "MAX_FILE_BYTES", "DatasetError", "DatasetIndex", "FileRefused", "check_encoded",
    "image_size", "open_dataset",
]

log = logging.getLogger(__name__)

FOLDER_CACHE_NAME = ".augsvc-index.json"
MANIFEST_CACHE_SUFFIX = ".augsvc-index.json"
MAX_LOGGED_REJECTS = 20


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    """Every usable image of a dataset: absolute path, label, decoded height and width, size."""

    root: Path  # the image folder, or the folder manifest paths are relative to
    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int32
    widths: np.ndarray  # (N,) int32
    sizes: np.ndarray  # (N,) int64, file sizes in bytes when indexed
    classes: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...] = ()  # (path, reason), excluded from the index
    manifest: Path | None = None  # the CSV manifest, when the dataset is one
    parsed: int = field(default=0, compare=False)  # headers parsed here (0: all cached)
    confined_to: str | None = None  # the resolved root every file must lie in; None: anywhere

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def source(self) -> Path:
        """The path the dataset was opened from (manifest or folder)."""
        return self.manifest if self.manifest is not None else self.root

    def read(self, i: int) -> bytes:
        """The encoded bytes of image `i`; FileRefused (an OSError) names what is wrong.

        Only the regular file the index saw, with the size it had, inside the root unless
        allowed (module docstring): never blocks, never reads more than the indexed size.
        """
        return read_file(self.paths[i], int(self.sizes[i]), self.confined_to)

    def relpath(self, i: int) -> str:
        """Image `i`'s path relative to the dataset root: what clients are told."""
        return os.path.relpath(self.paths[i], self.root)


def open_dataset(
    path: str | os.PathLike[str],
    *,
    cache: bool = True,
    classes: Sequence[str] | None = None,
    allow_outside: bool = False,
) -> DatasetIndex:
    """Index an image folder or CSV manifest (module docstring); use and refresh the cache.

    `classes` fixes the class list (labels are indices into it); a folder or manifest
    class name not in it is a DatasetError. `allow_outside` serves links and manifest
    rows that resolve outside the dataset root (refused by default). Raises DatasetError
    for a missing path, a bad manifest row or an empty dataset.
    """
    src = Path(os.path.abspath(os.fspath(path)))
    if not src.exists():
        raise DatasetError(f"no such dataset: {src}")
    fixed = tuple(classes) if classes is not None else None
    if src.is_dir():
        root, manifest = src, None
        found, rows, bad = scan_folder(src, fixed, allow_outside=allow_outside)
        names = fixed if fixed is not None else found
        cache_path = src / FOLDER_CACHE_NAME
    else:
        root, manifest = src.parent, src
        names, rows, bad = read_manifest(src, fixed, allow_outside=allow_outside)
        cache_path = src.with_name(src.name + MANIFEST_CACHE_SUFFIX)

    confined_to = None if allow_outside else os.path.realpath(root)
    cached = load_cache(cache_path, src) if cache else {}
    entries: dict[str, list] = {}
    parsed = 0
    paths, labels, heights, widths, sizes = [], [], [], [], []
    rejected, new = [], []  # new: rejections this open found first (not known from the cache)
    for key, _, reason in bad:  # refused by the listing: cached so they warn once
        entries[key] = [-1, -1, 0, 0, reason]
    for key, abspath, label, size, mtime in rows:
        entry = entries.get(key) or cached.get(key)  # a manifest may list a file twice
        if entry is None or entry[0] != size or entry[1] != mtime:
            entry = [size, mtime, *header_entry(abspath, confined_to)]
            parsed += 1
        entries[key] = entry
        if entry[4] is not None:
            bad.append((key, abspath, entry[4]))
        else:
            paths.append(abspath)
            labels.append(label)
            heights.append(entry[2])
            widths.append(entry[3])
            sizes.append(size)
    for key, abspath, reason in bad:
        rejected.append((abspath, reason))
        known = cached.get(key)
        if known is None or known[4] != reason:
            new.append((abspath, reason))
    if cache and (parsed or entries != cached):
        save_cache(cache_path, src, entries)
    _log_rejected(src, rejected, new)
    if not paths:
        detail = f"; {len(rejected)} file(s) rejected, e.g. {rejected[0]}" if rejected else ""
        raise DatasetError(f"no usable images in {src}{detail}")
    return DatasetIndex(
        root=root,
        paths=tuple(paths),
        labels=_frozen(np.array(labels, dtype=np.int64)),
        heights=_frozen(np.array(heights, dtype=np.int32)),
        widths=_frozen(np.array(widths, dtype=np.int32)),
        sizes=_frozen(np.array(sizes, dtype=np.int64)),
        classes=tuple(names),
        rejected=tuple(rejected),
        manifest=manifest,
        parsed=parsed,
        confined_to=confined_to,
    )



def _log_rejected(src: Path, rejected: list[tuple[str, str]],
                  new: list[tuple[str, str]]) -> None:
    """New rejections at WARNING (at most MAX_LOGGED_REJECTS lines); known ones at DEBUG."""
    if not rejected:
        return
    if not new:
        log.info("%s: %d file(s) rejected and excluded from the index, as when it was "
                 "indexed before (listed at --log-level debug)", src, len(rejected))
        for path, reason in rejected:
            log.debug("  rejected %s: %s", path, reason)
        return
    log.warning("%s: %d file(s) rejected and excluded from the index (%d new)", src,
                len(rejected), len(new))
    for path, reason in new[:MAX_LOGGED_REJECTS]:
        log.warning("  rejected %s: %s", path, reason)
    if len(new) > MAX_LOGGED_REJECTS:
        log.warning("  ... and %d more", len(new) - MAX_LOGGED_REJECTS)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
