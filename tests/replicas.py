"""Helpers for tests that stop, restart and add servers under a running loader.

* `Replicas`: `augsvc serve` processes (tests/serverproc.py) on chosen addresses, all
  cleaned up when the `with` block ends; `start(host, port)` starts one (again).
* `free_port(host)`: a port nothing listens on now (to restart a server on the same one).
* `assert_epoch(got, want)`: a pass equals the in-process engine's epoch
  (`epochs.engine_batches`), batch by batch.
* `consume(loader, on_batch, stall_s)`: iterate a loader, failing the test if no batch
  arrives for `stall_s` seconds (the consumer runs in a thread, so a hang cannot block
  the test).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serverproc import ServerProcess, running_server

__all__ = ["Replicas", "assert_epoch", "consume", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Replicas(contextlib.ExitStack):
    """`augsvc serve` processes started with `args`, stopped (SIGTERM, then SIGKILL of
    the group) when the `with` block ends, whatever state the test left them in."""

    def __init__(self, datasets: dict[str, Path], *args: str) -> None:
        super().__init__()
        self.datasets, self.args = datasets, args
        self._lock = threading.Lock()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> ServerProcess:
        """One more server on host:port (0: an ephemeral port); returns once it serves."""
        manager = running_server(self.datasets, "--host", host, "--port", str(port), *self.args)
        server = manager.__enter__()
        with self._lock:
            self.push(manager.__exit__)
        return server

    def start_later(self, *args: Any, delay: float = 0.0) -> Callable[[], ServerProcess]:
        """Start one in the background (after `delay` s); call the result to get it."""
        box: list[Any] = []

        def run() -> None:
            time.sleep(delay)
            try:
                box.append(self.start(*args))
            except BaseException as exc:  # handed to the caller
                box.append(exc)

        thread = threading.Thread(target=run, name="replica-start", daemon=True)
        thread.start()

        def result() -> ServerProcess:
            thread.join(120)
            if not box:
                raise TimeoutError("the server did not start within 120 s")
            if isinstance(box[0], BaseException):
                raise box[0]
            return box[0]

        return result


def assert_epoch(got: list[tuple[Any, ...]], want: list[Any], what: str = "the pass") -> None:
    """`got` ((images, labels) per batch) holds exactly the engine's batches `want`."""
    assert len(got) == len(want), f"{what}: {len(got)} batches, expected {len(want)}"
    for k, ((images, labels, *_), w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(labels, w.labels), f"{what}: labels of batch {k} differ"
        assert np.array_equal(images, w.images), f"{what}: pixels of batch {k} differ"


def consume(loader: Iterable[Any], on_batch: Callable[[int], None] = lambda i: None,
            stall_s: float = 20.0, what: str = "the pass") -> list[Any]:
    """Every item of `loader`; `on_batch(i)` runs after item i (in the consumer thread).
    Fails the test (pytest.fail) when no item arrives for `stall_s` seconds."""
    items: list[Any] = []
    errors: list[BaseException] = []
    last = [time.monotonic()]

    def run() -> None:
        try:
            for i, item in enumerate(loader):
                items.append(item)
                last[0] = time.monotonic()
                on_batch(i)
                last[0] = time.monotonic()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="consumer", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if thread.is_alive() and time.monotonic() - last[0] > stall_s:
            pytest.fail(f"{what} stalled: no batch for {stall_s:g} s after batch {len(items)}")
    if errors:
        raise errors[0]
    return items
