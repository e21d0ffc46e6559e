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
   (logger `augsvc.engine.dataset`, WARNING).
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

from augsvc.engine.headers import check_encoded, header_entry, image_size
from augsvc.engine.index_cache import load_cache, save_cache
from augsvc.engine.listing import DatasetError, read_manifest, scan_folder

__all__ = ["DatasetError", "DatasetIndex", "check_encoded", "image_size", "open_dataset"]

log = logging.getLogger(__name__)

FOLDER_CACHE_NAME = ".augsvc-index.json"
MANIFEST_CACHE_SUFFIX = ".augsvc-index.json"
MAX_LOGGED_REJECTS = 20


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
        found, rows, bad = scan_folder(src, fixed)
        names = fixed if fixed is not None else found
        cache_path = src / FOLDER_CACHE_NAME
    else:
        root, manifest = src.parent, src
        names, rows, bad = read_manifest(src, fixed)
        cache_path = src.with_name(src.name + MANIFEST_CACHE_SUFFIX)

    cached = load_cache(cache_path, src) if cache else {}
    entries: dict[str, list] = {}
    parsed = 0
    paths, labels, heights, widths = [], [], [], []
    rejected = list(bad)
    for key, abspath, label, size, mtime in rows:
        entry = entries.get(key) or cached.get(key)  # a manifest may list a file twice
        if entry is None or entry[0] != size or entry[1] != mtime:
            entry = [size, mtime, *header_entry(abspath)]
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
        save_cache(cache_path, src, entries)
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
