"""The files a dataset is made of: an image folder's class subfolders, or a CSV manifest's rows.

Both give `Row`s (cache key, absolute path, label, size, mtime_ns) and the class names;
`augsvc.engine.dataset` turns them into an index. Layouts are described there.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

__all__ = ["DatasetError", "Row", "read_manifest", "scan_folder"]

log = logging.getLogger("augsvc.engine.dataset")


class DatasetError(ValueError):
    """A dataset path, layout or manifest that cannot be indexed."""



# (cache key, absolute path, label, size, mtime_ns)
Row = tuple[str, str, int, int, int]


def scan_folder(
    root: Path, fixed: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[Row], list[tuple[str, str]]]:
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
    rows: list[Row] = []
    bad: list[tuple[str, str]] = []
    prefix = len(os.path.join(root, ""))
    for name in found:
        stack = [os.path.join(root, name)]
        class_rows: list[Row] = []
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


def read_manifest(
    manifest: Path, fixed: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[Row], list[tuple[str, str]]]:
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

    rows: list[Row] = []
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
