"""`--gpus`: which GPUs the workers use, found and assigned without touching CUDA.

`augsvc serve --gpus 0,1 --workers 2` runs two workers on each GPU, four processes on one
port. Slot s (the supervisor's worker numbering, kept when a worker is replaced) runs on
`gpus[s // workers]`. A worker is pinned to its GPU by `CUDA_VISIBLE_DEVICES`, set in the
forked child before DALI or CUDA start (the parent never loads either), so inside it the
GPU is device 0. GPU indices count the GPUs this process sees: entries of an existing
`CUDA_VISIBLE_DEVICES`, else the driver's list (`/proc/driver/nvidia/gpus`).
"""

from __future__ import annotations

import os

__all__ = ["parse_gpus", "pin_to_gpu", "served_gpus", "visible_gpus", "worker_gpu"]

_VISIBLE = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` entries (ids or UUIDs)."""
    env = os.environ.get(_VISIBLE)
    if env is not None:
        return [item.strip() for item in env.split(",") if item.strip()]
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        count = 0
    return [str(i) for i in range(count)]


def parse_gpus(text: str) -> tuple[int, ...]:
    """`--gpus`: "all" or comma-separated indices ("0,1"); ValueError saying what is wrong."""
    text = text.strip()
    visible = visible_gpus()
    if text == "all":
        if not visible:
            raise ValueError("--gpus all: no NVIDIA GPU is visible (no /proc/driver/nvidia/gpus "
                             f"and no {_VISIBLE})")
        return tuple(range(len(visible)))
    try:
        gpus = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ValueError(f"--gpus {text!r}: expected 'all' or indices like 0,1") from None
    if min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {text!r}: indices must be distinct and >= 0")
    if visible and max(gpus) >= len(visible):
        raise ValueError(f"--gpus {text!r}: this machine shows {len(visible)} GPU(s), "
                         f"indices 0..{len(visible) - 1}")
    return gpus


def worker_gpu(slot: int, workers: int, gpus: tuple[int, ...]) -> int | None:
    """The GPU index of worker `slot` (None without --gpus)."""
    return gpus[slot // workers] if gpus else None


def served_gpus(gpus: tuple[int, ...], device_id: int) -> list[str]:
    """The `CUDA_VISIBLE_DEVICES` entries of the GPUs the workers use: `gpus`, or the one
    `device_id` names."""
    visible = visible_gpus()
    return [visible[i] if i < len(visible) else str(i) for i in gpus or (device_id,)]


def pin_to_gpu(gpu: int) -> str:
    """Make GPU `gpu` this process's only (and so device 0) GPU; its visible id."""
    visible = visible_gpus()
    device = visible[gpu] if gpu < len(visible) else str(gpu)
    os.environ[_VISIBLE] = device
    return device
