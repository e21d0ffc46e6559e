"""Opening a dataset's files without trusting them: regular files only, inside the root, bounded.

A dataset folder can change after it was indexed, and it may hold links. Every open of a
dataset file goes through `open_regular`, every read of a whole image through `read_file`:

* the path is stat'ed first and opened only if it is a regular file, with `O_NONBLOCK`
  (a FIFO swapped in later cannot block the open) and `O_NOCTTY`; the open file is
  fstat'ed again (same regular file, or it is refused);
* unless the dataset allows it, the file that was actually opened (`/proc/self/fd`)
  must lie inside the dataset root (after resolving every link);
* `read_file` reads at most the size the index recorded, plus one byte to notice growth,
  and the index holds no file over `MAX_FILE_BYTES`.

A refusal is a `FileRefused` (an `OSError`) whose message names the kind of failure only,
never the file's content nor an absolute path: it goes back to clients as
`DroppedSample.reason`.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "MAX_FILE_BYTES", "OUTSIDE_HINT", "FileRefused", "inside", "kind", "open_regular", "read_file",
]

MAX_FILE_BYTES = 64 << 20  # an image file larger than this is not indexed
OUTSIDE_HINT = "allow it with `augsvc serve --allow-outside-root`"
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR,
          "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileRefused(OSError):
    """A dataset file that is not read; the message names the kind of failure only."""


def kind(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO", "a character device", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def inside(path: str, root: str) -> bool:
    """Whether `path` (already resolved) is `root` (already resolved) or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_regular(path: str, root: str | None = None) -> tuple[int, os.stat_result]:
    """An fd (and its fstat) of the regular file `path`; FileRefused otherwise.

    `root`: the resolved dataset root the opened file must lie in (None: anywhere).
    The caller closes the fd.
    """
    try:
        before = os.stat(path)
    except OSError as exc:
        raise FileRefused(f"unreadable: {exc.strerror or type(exc).__name__}") from None
    if not stat.S_ISREG(before.st_mode):
        raise FileRefused(f"not a regular file ({kind(before.st_mode)})")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FileRefused(f"unreadable: {exc.strerror or type(exc).__name__}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev,
                                                                       before.st_ino):
            raise FileRefused("replaced while being opened")
        if root is not None and not inside(_opened_path(fd, path), root):
            raise FileRefused(f"resolves outside the dataset root ({OUTSIDE_HINT})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_file(path: str, size: int, root: str | None = None) -> bytes:
    """The bytes of a regular file that had `size` bytes when indexed; FileRefused otherwise."""
    fd, st = open_regular(path, root)
    try:
        if st.st_size != size:
            raise FileRefused(f"changed since indexing: {st.st_size} bytes, indexed with "
                              f"{size}; re-index the dataset (restart the server)")
        chunks, want = [], min(size, MAX_FILE_BYTES) + 1
        while want > 0:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
    except FileRefused:
        raise
    except OSError as exc:
        raise FileRefused(f"unreadable: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)  # one chunk: that same object, no copy
    if len(data) != size:
        how = "grew" if len(data) > size else "shrank"
        raise FileRefused(f"changed since indexing: it {how} while being read")
    return data


def _opened_path(fd: int, path: str) -> str:
    """The resolved path of an open file (Linux: /proc/self/fd; elsewhere: realpath)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
