"""A small progress bar on stderr, for long loops in commands (no tqdm dependency).

    for path in progress(paths, desc="stats"):
        ...

By default it draws only when the stream is a terminal: one line redrawn in place
(`\\r`) at most every 0.1 s. Forced on (`enabled=True`) into a file or pipe, it
writes whole lines instead, at most every 5 s, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["progress"]

T = TypeVar("T")

BAR_WIDTH = 24
TTY_INTERVAL_S = 0.1
LOG_INTERVAL_S = 5.0


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    *,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Yield from `iterable`, drawing progress on `stream` (stderr).

    `total` defaults to `len(iterable)` when it has one. `enabled=None` draws only
    when the stream is a TTY. The final state is always drawn, also after a `break`.
    """
    out = sys.stderr if stream is None else stream
    tty = _isatty(out)
    if enabled is None:
        enabled = tty
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    interval = TTY_INTERVAL_S if tty else LOG_INTERVAL_S
    start = last = time.monotonic()
    done = 0
    try:
        for item in iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= interval:
                last = now
                _draw(out, tty, _line(desc, done, total, now - start))
    finally:
        _draw(out, tty, _line(desc, done, total, time.monotonic() - start))
        if tty:
            out.write("\n")
            out.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _draw(out: TextIO, tty: bool, line: str) -> None:
    out.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
    out.flush()


def _line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    """`desc: 12/100  12% |###.....| 3.4 it/s eta 0:26` (no bar or eta without a total)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    head = f"{desc}: " if desc else ""
    if not total:
        return f"{head}{done} [{_clock(elapsed)}, {rate:.1f} it/s]"
    frac = min(done / total, 1.0)
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    eta = (total - done) / rate if rate > 0 else 0.0
    return (f"{head}{done}/{total} {frac:4.0%} |{bar}| {rate:.1f} it/s "
            f"[{_clock(elapsed)}<{_clock(eta)}]")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
