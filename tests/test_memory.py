"""glibc malloc settings: the loader's thresholds, a server process's arenas."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from augsvc.client import memory
from augsvc.server import memory as server_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tune_malloc_stops_page_faults_on_reused_blocks() -> None:
    # in a fresh process, what a loader does per batch: a 10 MiB batch is filled from
    # five freshly received 2 MiB chunks, and the trainer keeps the last two batches.
    # glibc's defaults fault most of that memory in again every batch; tuned, the
    # freed blocks are reused
    code = """
import resource, sys
from augsvc.client import memory
from augsvc.server import memory as server_memory
if sys.argv[1] == "tuned":
    assert memory.tune_malloc() and memory.tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def batch():
    out = bytearray(10 << 20)
    for i in range(5):
        out[i << 21 : (i + 1) << 21] = bytes(2 << 20)
    return out
kept = [batch(), batch()]
before = faults()
for _ in range(50):
    kept = [kept[1], batch()]
print(faults() - before)
"""
    counts = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                             text=True, check=True)
        counts[mode] = int(out.stdout)
    assert counts["default"] > 50 * 150, counts  # measured ~350 faults per batch
    assert counts["tuned"] * 3 < counts["default"], counts  # measured ~60


def test_tune_malloc_answers_the_same_every_time() -> None:
    first = memory.tune_malloc()
    assert memory.tune_malloc() is first
    assert first is GLIBC


ARENA_CODE = """
import ctypes, sys, threading
from augsvc.server import memory
if sys.argv[1] == "limited":
    assert memory.limit_malloc_arenas()
elif sys.argv[1] == "environment":
    assert not memory.limit_malloc_arenas()  # MALLOC_ARENA_MAX is set: left alone
barrier = threading.Barrier(16)
def work():
    barrier.wait()
    blocks = [bytearray(300_000) for _ in range(8)]
    barrier.wait()
    del blocks
threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def _arenas(mode: str, env: dict[str, str]) -> tuple[int, str]:
    """How many malloc arenas 16 threads allocating at once got, in a fresh process."""
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run([sys.executable, "-c", ARENA_CODE, mode], env=environ,
                         capture_output=True, text=True, timeout=60, check=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines()), out.stderr


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize(("mode", "env", "most"), [("limited", {}, server_memory.ARENAS),
                                                   ("environment", {"MALLOC_ARENA_MAX": "3"}, 3)])
def test_a_server_process_keeps_its_malloc_arenas_few(mode, env, most) -> None:
    """16 threads allocating at once get at most ARENAS arenas, unless MALLOC_ARENA_MAX
    says otherwise."""
    arenas, stats = _arenas(mode, env)
    assert 1 <= arenas <= most, stats


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_glibc_alone_makes_many_arenas() -> None:
    """The control: without the cap the same threads get more (up to 8 per core)."""
    arenas, stats = _arenas("default", {})
    assert arenas > 2, stats
