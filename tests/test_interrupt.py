"""Training loops that end abnormally (Ctrl-C, a DataLoader worker error) end at once and quietly.

Each loop runs in a subprocess against a real `augsvc serve` on loopback; the test sends
SIGINT as a terminal's Ctrl-C would (to the whole process group) and reads what the loop
printed: how many loader threads were left, and any traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from serverproc import REPO_ROOT, running_server

pytestmark = pytest.mark.timeout(180)

PRELUDE = """
import sys, threading, time
from augsvc import AugmentLoader, AugmentSpec, AugsvcError

def streams_left_after(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(t.name.startswith("augsvc-stream") for t in threading.enumerate()):
            return 0
        time.sleep(0.01)
    return sum(t.name.startswith("augsvc-stream") for t in threading.enumerate())

loader = AugmentLoader(sys.argv[1], "photos", AugmentSpec(size=(32, 32), hsv=False, pca=False),
                       batch_size=1, streams_per_server=2, timeout=20)
"""

LOOPS = {
    "for": """
        try:
            for epoch in range(10_000):
                for images, labels in loader:
                    print("step", flush=True)
                    time.sleep(0.02)
        except KeyboardInterrupt:
            print("interrupted; streams left:", streams_left_after(1.0), flush=True)
        """,
    "held iterator": """
        try:
            with loader:
                batches = loader.epochs()
                while True:
                    next(batches)
                    print("step", flush=True)
                    time.sleep(0.02)
        except KeyboardInterrupt:
            print("interrupted; streams left:", streams_left_after(1.0), flush=True)
        """,
    "DataLoader workers": """
        import torch
        data = torch.utils.data.DataLoader(loader.torch_dataset(), batch_size=None,
                                           num_workers=2)
        try:
            for epoch in range(10_000):
                loader.set_epoch(epoch)
                for images, labels in data:
                    print("step", flush=True)
                    time.sleep(0.02)
        except KeyboardInterrupt:
            print("interrupted; streams left:", streams_left_after(1.0), flush=True)
        """,
}


def start(code: str, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def wait_for(proc: subprocess.Popen, word: str) -> None:
    for line in proc.stdout:
        if word in line:
            return
    raise AssertionError(f"the loop ended before printing {word!r}: {proc.stderr.read()}")


def group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(jpeg_folder: Path):
    with running_server({"photos": jpeg_folder}) as server:
        yield server


@pytest.mark.parametrize("loop", list(LOOPS))
def test_ctrl_c_ends_the_loop_quietly(server, loop):
    if loop == "DataLoader workers":
        pytest.importorskip("torch")
    proc = start(LOOPS[loop], server.address)
    try:
        for _ in range(3):
            wait_for(proc, "step")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "interrupted; streams left: 0" in out, (out, err)
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert proc.returncode == 0, err
    assert group_gone(proc.pid, 5.0), "DataLoader workers outlived the loop"
    print(f"{loop}: exited {took:.2f} s after SIGINT")


@pytest.mark.timeout(120)
def test_dataloader_worker_error_exits_without_a_stall(server):
    """Every worker fails (batch_size over the server's limit: RESOURCE_EXHAUSTED); the
    loop catches the error and ends: no worker is left waiting to be joined."""
    pytest.importorskip("torch")
    code = """
        import torch
        big = AugmentLoader(sys.argv[1], "photos", AugmentSpec(size=(32, 32)), batch_size=1025,
                            tail="pad")
        data = torch.utils.data.DataLoader(big.torch_dataset(), batch_size=None, num_workers=2)
        try:
            for images, labels in data:
                pass
        except Exception as exc:
            print("error:", type(exc).__name__, str(exc).replace("\\n", " "), flush=True)
            started = time.monotonic()
        # leaving the except block drops the traceback, and with it the DataLoader's iterator
        print(f"cleaned up in {time.monotonic() - started:.2f} s", flush=True)
        """
    proc = start(code, server.address)
    try:
        out, err = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "error: AugsvcError" in out and "RESOURCE_EXHAUSTED" in out, (out, err)
    cleanup = float(out.split("cleaned up in ")[1].split()[0])
    assert cleanup < 4.0, out  # torch waits 5 s for each worker that does not stop
    assert proc.returncode == 0 and group_gone(proc.pid, 5.0), err
