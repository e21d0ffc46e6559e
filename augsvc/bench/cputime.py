"""CPU seconds of this process and every process it started, for `augsvc bench`.

Images per CPU-second (all processes of a measurement: client, servers, their threads)
is disturbed far less by other work on a shared machine than images per second, which
is what a busy 2-core machine makes of every wall-clock figure. Linux (`/proc`) only.
"""

from __future__ import annotations

import os
import resource

__all__ = ["tree_cpu_seconds"]


def tree_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and its live descendants (None without
    /proc). A descendant that exits takes its seconds with it: measure while they run."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(pid)
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
    todo = list(children.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        total += seconds.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total
