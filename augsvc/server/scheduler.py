"""`Scheduler`: one pipeline of a worker, shared by all its streams, fed fairly.

One thread per pipeline. Of the streams that have a batch to make, room for it (fewer
than `depth` made ahead of their handler) and memory for it in the worker's budget, it
serves the one whose client has had the fewest images from this pipeline so far (fair
queueing; a client is a connection, which outlives the calls a loader makes on it, one
per few batches). With equal demand that is round robin, one batch per stream per
round; no stream starves, whatever the others ask for. A client that comes (back)
starts level with the least served one attached, so it gets no credit for the time it
was away. A batch found in the batch cache is sent from there.

Two batches are in the pipeline at once (`IN_FLIGHT`): while DALI runs batch k+1, the
thread reads the files of the batch after it and cuts batch k's frames straight from
DALI's output (the one copy grpcio's bytes need), then drops the output, which DALI
reuses. Handlers send the frames on their own threads meanwhile.

A pipeline that fails to build, or fails in a way the corrupt-image handling does not
cover, fails every stream on it (INTERNAL, which clients retry) and is discarded; the
next stream builds a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from augsvc import wire
from augsvc.engine.augmenter import AugmentedBatch, Augmenter, StartedBatch
from augsvc.server.batchcache import BatchCache
from augsvc.server.memory import Charge, MemoryBudget
from augsvc.server.metrics import ServerMetrics
from augsvc.server.producer import Job, StreamWork

__all__ = ["IN_FLIGHT", "Scheduler"]

log = logging.getLogger("augsvc.server")

IN_FLIGHT = 2  # batches in the pipeline at once: one computing while one is collected
CLIENTS_KEPT = 1024  # service counts remembered for clients not attached any more


@dataclass
class _Started:
    work: StreamWork
    k: int
    charge: Charge  # its memory in the worker's budget
    started: StartedBatch | None  # None: `frames` came from the batch cache
    frames: tuple[bytes, ...] | None = None
    at: float = 0.0  # when it was started (time.monotonic())


class Scheduler:
    """Runs the batches of every attached `StreamWork` on one `Augmenter` (module doc).

    `build` makes the Augmenter (on the scheduler's thread, so no handler waits for it);
    `on_exit(scheduler, error)` tells the pool the thread ended, `on_idle()` that the
    last stream left; `wake_all` wakes every scheduler of the worker (memory was given
    back); `metrics` gets each batch's queue and pipeline time. All state, the budget's
    included, is guarded by `lock`, the worker's scheduling lock.
    """

    def __init__(self, key: Hashable, build: Callable[[], Augmenter], *,
                 lock: threading.Lock, budget: MemoryBudget, cache: BatchCache,
                 on_exit: Callable[[Scheduler, BaseException | None], None],
                 on_idle: Callable[[], None], wake_all: Callable[[], None],
                 metrics: ServerMetrics) -> None:
        self.key = key
        self._build, self._cache, self._on_exit, self.pool_wake = build, cache, on_exit, wake_all
        self._on_idle = on_idle
        self._budget, self._metrics = budget, metrics
        self._cond = threading.Condition(lock)
        self.streams: list[StreamWork] = []
        self.idle_since = time.monotonic()
        self.closing = False
        self.batches = 0  # batches made (for tests and logs)
        self._served: OrderedDict[str, int] = OrderedDict()  # images made per client
        self._thread = threading.Thread(target=self._run, name="augsvc-pipeline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- called with the lock held

    def attach(self, work: StreamWork) -> None:
        work.scheduler = self
        level = min((self._served[w.client] for w in self.streams), default=0)
        self._served[work.client] = max(self._served.pop(work.client, 0), level)
        while len(self._served) > CLIENTS_KEPT:
            self._served.popitem(last=False)  # least recently attached
        work.due_since = time.monotonic()
        self.streams.append(work)
        self._cond.notify()

    def detach(self, work: StreamWork) -> None:
        if work in self.streams:
            self.streams.remove(work)
            if not self.streams:
                self.idle_since = time.monotonic()
                self._on_idle()

    def wake(self) -> None:
        self._cond.notify()

    def close(self) -> None:
        """Stop once the batches in the pipeline are done (no stream may be attached)."""
        self.closing = True
        self._cond.notify()

    def _pick(self) -> tuple[StreamWork, int, Charge] | None:
        """The least served stream with a batch to start, room and memory for it."""
        eligible = [w for w in self.streams if w.todo and not w.closed
                    and w.failure is None and w.ahead < w.depth]
        for work in sorted(eligible, key=lambda w: self._served[w.client]):  # ties: attach order
            charge = self._budget.charge(work.estimate, force=work._urgent())
            if charge is not None:
                self._served[work.client] += work.job.request.batch_size
                work.ahead += 1
                now = time.monotonic()
                if work.due_since is not None:
                    self._metrics.stage("queue", now - work.due_since)
                work.due_since = now if work.ahead < work.depth else None
                return work, work.todo.popleft(), charge
        return None

    # --- the thread

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        in_flight: deque[_Started] = deque()  # the item being finished stays in it until done
        error: BaseException | None = None
        augmenter: Augmenter | None = None
        try:
            augmenter = self._build()
            while True:
                with self._cond:
                    while (pick := self._pick()) is None and not in_flight:
                        if self.closing:
                            return
                        self._cond.wait()
                if pick is not None:
                    try:
                        in_flight.append(self._start(augmenter, *pick))
                    except Exception:
                        with self._cond:
                            self._budget.release(pick[2])
                        raise
                    if len(in_flight) < IN_FLIGHT:
                        continue
                self._finish(augmenter, in_flight[0])
                in_flight.popleft()
        except Exception as exc:
            error = exc
            log.exception("pipeline %s failed; failing its streams", self.key)
            with self._cond:
                for item in in_flight:
                    self._budget.release(item.charge)
        finally:
            if augmenter is not None:
                augmenter.close()
            self._on_exit(self, error)

    def _start(self, augmenter: Augmenter, work: StreamWork, k: int,
               charge: Charge) -> _Started:
        job = work.job
        frames = self._cache.get(job.cache_key(k))
        if frames is not None:
            return _Started(work, k, charge, None, frames)
        at = time.monotonic()
        batch = job.plan.batch(k, job.request.rank)
        started = augmenter.start(job.request.seed, job.request.epoch, batch.sample_ids,
                                  batch.draw_ids)
        return _Started(work, k, charge, started, at=at)

    def _finish(self, augmenter: Augmenter, item: _Started) -> None:
        frames = item.frames
        if item.started is not None:
            result = augmenter.finish(item.started)
            try:
                frames = _encode(item.work.job, item.k, result)
            except Exception as exc:  # this batch cannot be sent; the pipeline is fine
                with self._cond:
                    item.work._fail(exc)
                    self._budget.release(item.charge)
                return
            del result  # DALI's output buffer is free for reuse from here
            self._metrics.stage("pipeline", time.monotonic() - item.at)
            self._cache.put(item.work.job.cache_key(item.k), frames)
        with self._cond:
            self.batches += 1
            item.work._deliver(item.k, frames, item.charge)


def _encode(job: Job, k: int, result: AugmentedBatch) -> tuple[bytes, ...]:
    """Batch k's wire frames: one copy of the pixels, cut from the pipeline's output."""
    return tuple(wire.encode_batch(
        result.images, batch_index=k, layout=job.request.spec.layout, labels=result.labels,
        sample_ids=result.sample_ids, draw_ids=result.draw_ids, dropped=result.dropped,
        substituted=result.substituted, stats_source=job.stats_source,
        stats_digest=job.stats.digest, chunk_bytes=job.chunk_bytes,
    ))
