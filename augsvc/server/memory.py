"""A worker's memory: the budget for prefetched batches, its default, and giving memory back.

`--max-memory` bounds the bytes of batches a worker holds for all its streams together
(being made, made and not yet handed to gRPC, or being sent): a `MemoryBudget`. Its default
is `DEFAULT_SHARE` of the memory this machine can still give (MemAvailable, or what is
left under a cgroup limit when that is smaller), divided among the worker processes,
and at least `MIN_DEFAULT`.

`release_free_memory` gives freed memory back to the system: glibc keeps freed heap
pages (batches are 10-40 MB of 2 MiB frames) until `malloc_trim`, and DALI keeps its
pools until `ReleaseUnusedMemory`.

`limit_malloc_arenas` caps glibc's malloc arenas at `ARENAS` per worker. By default glibc
gives threads up to 8 arenas per core, and a worker has tens of gRPC threads: a burst of
large requests (a hostile client's 1 MB names) leaves freed blocks scattered over many
arenas that `malloc_trim` cannot give back. Measured with `scripts/fuzz_server.py
--requests 10000`: RSS after the fuzz x1.24-1.26 of its start with glibc's default,
x1.06 with 2 arenas. A `MALLOC_ARENA_MAX` in the environment is left to rule.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path
from typing import Protocol

from augsvc.core.glibc import glibc_function

__all__ = ["ARENAS", "DEFAULT_SHARE", "MIN_DEFAULT", "Charge", "MemoryBudget",
           "available_memory", "default_max_memory", "limit_malloc_arenas",
           "release_free_memory"]


ARENAS = 2  # glibc malloc arenas per server process (module doc)
_M_ARENA_MAX = -8  # mallopt parameter, from <malloc.h>
DEFAULT_SHARE = 0.25  # of the available memory, for all workers' prefetched batches
MIN_DEFAULT = 256 << 20
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number
_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup limit."""
    available = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            left = max(0, limit - usage)
            available = left if available is None else min(available, left)
            break
    return available


def default_max_memory(processes: int) -> int:
    """The default --max-memory of one worker among `processes`."""
    available = available_memory()
    if available is None:
        return 1 << 30
    return max(MIN_DEFAULT, int(available * DEFAULT_SHARE) // max(1, processes))


class _Settable(Protocol):
    def set(self, value: float) -> None: ...


class Charge:
    """Bytes charged to a `MemoryBudget`."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class MemoryBudget:
    """Bytes of batches held against `limit`. When nothing is held, one batch of any size
    fits, so a small budget slows streams down but never stops them; a charge can also be
    forced past the limit (see `StreamWork`). The caller holds the lock that guards it
    (the worker's scheduling lock). `gauge` (e.g. a Prometheus gauge) is set to the
    bytes held at every change."""

    def __init__(self, limit: int, gauge: _Settable | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._gauge = gauge

    def _changed(self, delta: int) -> None:
        if not delta:
            return
        self.used += delta
        self.peak = max(self.peak, self.used)
        if self._gauge is not None:
            self._gauge.set(self.used)

    def charge(self, nbytes: int, force: bool = False) -> Charge | None:
        """Charge `nbytes` if they fit (or `force`), else None."""
        if self.used and self.used + nbytes > self.limit and not force:
            return None
        self._changed(nbytes)
        return Charge(nbytes)

    def resize(self, charge: Charge, nbytes: int) -> None:
        """Correct a charge to the size the batch turned out to have."""
        self._changed(nbytes - charge.nbytes)
        charge.nbytes = nbytes

    def release(self, charge: Charge) -> None:
        """Give a charge back (once; releasing it again does nothing)."""
        self._changed(-charge.nbytes)
        charge.nbytes = 0


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (module doc); False where not done."""
    mallopt = glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> None:
    """Return freed memory to the system: DALI's unused pool memory, then glibc's free heap."""
    dali = sys.modules.get("nvidia.dali.backend")
    if dali is not None:
        with contextlib.suppress(Exception):  # no CUDA here, or an older DALI
            dali.ReleaseUnusedMemory()
    trim = glibc_function("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)  # ctypes releases the GIL for the call
