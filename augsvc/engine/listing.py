"""The files a dataset is made of: an image folder's class subfolders, or a CSV manifest's rows.

Both give `Row`s (cache key, absolute path, label, size, mtime_ns), the class names and
the `Rejected` entries (cache key, absolute path, reason) the rules below exclude;
`augsvc.engine.dataset` turns them into an index. Layouts and rules are described there:
only regular files of at most `MAX_FILE_BYTES`; no link (file or folder) that resolves
outside the dataset root unless `allow_outside`; a folder is walked once, so a directory
link back to a folder already walked (a loop, or a second name for a folder) is not
followed.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import stat
from pathlib import Path

from augsvc.engine.files import MAX_FILE_BYTES, OUTSIDE_HINT, inside, kind

__all__ = ["DatasetError", "Rejected", "Row", "read_manifest", "scan_folder"]

log = logging.getLogger("augsvc.engine.dataset")


class DatasetError(ValueError):
    """A dataset path, layout or manifest that cannot be indexed."""


# (cache key, absolute path, label, size, mtime_ns)
Row = tuple[str, str, int, int, int]
# (cache key, absolute path, reason): excluded from the index
Rejected = tuple[str, str, str]
Listing = tuple[tuple[str, ...], list[Row], list[Rejected]]


class _Rules:
    """The checks every file and folder of one dataset passes (module docstring)."""

    def __init__(self, root: Path, allow_outside: bool) -> None:
        self.real_root = os.path.realpath(root)
        self.allow_outside = allow_outside
        self.visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders walked
        self._real_dirs: dict[str, str] = {}

    def check(self, path: str) -> os.stat_result | str:
        """The stat of a usable file or folder, else why it is refused."""
        try:
            lst = os.lstat(path)
            st = os.stat(path) if stat.S_ISLNK(lst.st_mode) else lst
        except OSError as exc:
            return f"cannot stat: {exc.strerror or type(exc).__name__}"
        if not self.allow_outside and not inside(self._resolve(path, lst), self.real_root):
            return f"resolves outside the dataset root ({OUTSIDE_HINT})"
        if stat.S_ISDIR(st.st_mode):
            return st
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({kind(st.st_mode)})"
        if st.st_size > MAX_FILE_BYTES:
            return f"too large: {st.st_size} bytes (the limit is {MAX_FILE_BYTES >> 20} MiB)"
        return st

    def folder(self, path: str) -> os.stat_result | str:
        """`check`, and a folder is refused if it was walked already (else marked walked)."""
        st = self.check(path)
        if isinstance(st, str) or not stat.S_ISDIR(st.st_mode):
            return st
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            return _REPEAT
        self.visited.add(key)
        return st

    def _resolve(self, path: str, lst: os.stat_result) -> str:
        """The real path; a non-link only resolves its folder (cached per folder)."""
        if stat.S_ISLNK(lst.st_mode):
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real, name)


_REPEAT = "folder already walked (a directory link loop or a second name for it): not followed"


def scan_folder(root: Path, fixed: tuple[str, ...] | None, *,
                allow_outside: bool = False) -> Listing:
    """(classes found, rows, rejected entries) of an image folder."""
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
    rules = _Rules(root, allow_outside)
    rules.folder(str(root))
    prefix = len(os.path.join(root, ""))
    tops: list[str] = []
    bad: list[Rejected] = []
    for name in found:  # every class folder is claimed before any is walked
        path = os.path.join(root, name)
        st = rules.folder(path)
        if isinstance(st, str):
            bad.append((name, path, st))
        else:
            tops.append(name)
    rows: list[Row] = []
    for name in tops:
        stack = [os.path.join(root, name)]
        class_rows: list[Row] = []
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    key = e.path[prefix:]
                    st = rules.folder(e.path)
                    if isinstance(st, str):
                        bad.append((key, e.path, st))
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append(e.path)
                    else:
                        class_rows.append((key, e.path, label_of[name], st.st_size, st.st_mtime_ns))
        if not class_rows:
            log.warning("%s: class folder %r has no usable files", root, name)
        rows.extend(sorted(class_rows))
    return found, rows, bad


def read_manifest(manifest: Path, fixed: tuple[str, ...] | None, *,
                  allow_outside: bool = False) -> Listing:
    """(classes, rows, rejected rows) of a CSV manifest; DatasetError names the bad line."""
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

    rows: list[Row] = []
    bad: list[Rejected] = []
    base = manifest.parent
    rules = _Rules(base, allow_outside)
    for (_, rel, _), label in zip(records, labels, strict=True):
        abspath = os.path.normpath(os.path.join(base, rel))
        st = rules.check(abspath)
        if not isinstance(st, str) and stat.S_ISDIR(st.st_mode):
            st = "a folder, not an image file"
        if isinstance(st, str):
            bad.append((rel, abspath, st))
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
