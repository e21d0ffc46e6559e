"""augsvc.client.memory: glibc malloc thresholds, set once per process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from augsvc.client import memory

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
