"""The tokens a server accepts: `--token` (one, fixed) or `--token-file`, read again when
the file changes, so a token is rotated without a restart.

A token file holds one token a line (blank lines ignored); every one is accepted. Rotation
is two writes: the old and the new token (trainers move to the new one when they next
start), then the new one alone. Each worker checks the file's identity (device, inode,
size, modification and change times: `os.stat`, which follows the symlinks a Kubernetes
Secret volume swaps) at most once a second, on a call; a file that cannot be read or holds
no token keeps the tokens read before, with a warning, until it changes again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

__all__ = ["RECHECK_S", "TokenFile", "read_tokens", "token_lines"]

log = logging.getLogger("augsvc.server")

RECHECK_S = 1.0  # a worker looks at the token file at most this often

_Stamp = tuple[int, int, int, int, int]


def read_tokens(path: Path) -> frozenset[bytes]:
    """The tokens in `path`, or ValueError saying why there are none."""
    return frozenset(token.encode() for token in token_lines(path))


def token_lines(path: Path) -> list[str]:
    """The tokens in `path` in file order (the newest last, by the rotation's rule), or
    ValueError saying why there are none."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--token-file: cannot read {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from exc
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"--token-file: {path} is empty")
    for number, token in enumerate(tokens, 1):
        if not token.isprintable():
            raise ValueError(f"--token-file: {path}: token {number} is not printable text")
    return tokens


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class TokenFile:
    """`tokens()`: what `path` holds now, read again when it changes (module docstring)."""

    def __init__(self, path: Path, recheck_s: float = RECHECK_S) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._stamp = _stamp(path)
        self._tokens = read_tokens(path)  # at start, a bad file is the caller's ValueError
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def tokens(self) -> frozenset[bytes]:
        """The accepted tokens (never empty)."""
        if time.monotonic() - self._checked < self.recheck_s:
            return self._tokens
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.recheck_s:
                self._checked = now
                self._reload()
        return self._tokens

    def _reload(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            tokens = read_tokens(self.path)
        except ValueError as exc:
            log.warning("%s; the %d token(s) read before stay accepted", exc, len(self._tokens))
            return
        if tokens != self._tokens:
            self._tokens = tokens
            log.info("token file %s read again: %d token(s) accepted", self.path, len(tokens))
