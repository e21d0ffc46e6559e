"""The augmentation engine: dataset + spec + statistics + DALI pipeline -> augmented batches.

`Augmenter.run(seed, epoch, sample_ids, draw_ids)` reads the files (thread pool),
draws the batch's parameters (`augsvc.core.draws`), runs the pipeline and returns an
`AugmentedBatch`. The server and the in-process benchmark both use it, so what a
trainer receives over the wire is exactly what this returns. `start` and `finish` are
the two halves of `run`: several batches may be started before the first is finished
(finished in the order started), so files are read and results encoded while DALI runs.

Corrupt-image policy (`AugmentSpec.corrupt`; see `augsvc.engine.dataset`): a sample
is unusable when its file cannot be read or the dataset's file rules refuse it
(`augsvc.engine.files`: a FIFO, a link leaving the root, a file changed since
indexing), its bytes fail `check_encoded`, or DALI cannot decode it. With "substitute"
(the default) its row goes to the first usable of `augsvc.core.sampling.substitutes(seed,
epoch, draw id)`: a pure function of the sample's place in the epoch, so every server
picks the same stand-in and augments it the same way (its own, negative, draw id); it is
listed in `AugmentedBatch.substituted`.
If none of the `SUBSTITUTE_ATTEMPTS` stand-ins is usable, or with "drop", the sample
is DROPPED: left out of the batch (which is then shorter) and listed in
`AugmentedBatch.dropped` with its path and the reason. Paths are relative to the
dataset root, reasons name the kind of failure (never a file's content); each unusable
file is logged once per process at WARNING, later at DEBUG. Limit: damage inside the
entropy-coded data of a JPEG whose structure is intact is repaired by libjpeg with a
warning ("Corrupt JPEG data"), not an error, so such an image is decoded with
artefacts, as every JPEG decoder would.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from augsvc.core.draws import BatchParams, draw_params
from augsvc.core.sampling import SUBSTITUTE_ATTEMPTS, Batch, substitutes
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.core.types import DroppedSample, Substitution
from augsvc.engine.dataset import DatasetIndex, FileRefused, check_encoded
from augsvc.engine.pipeline import AugmentPipeline, PipelineError

__all__ = ["AugmentedBatch", "Augmenter", "DroppedSample", "StartedBatch", "Substitution"]

log = logging.getLogger(__name__)
_warned: set[str] = set()  # files whose trouble was logged at WARNING in this process


@dataclass(frozen=True)
class AugmentedBatch:
    """One finished batch; `images[i]` is sample `sample_ids[i]` with label `labels[i]`."""

    images: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    draw_ids: np.ndarray
    dropped: tuple[DroppedSample, ...] = ()
    substituted: tuple[Substitution, ...] = ()


@dataclass
class _Slot:
    """One row of a batch being made: the sample it holds now, and what became of its own."""

    own_id: int  # the row's own sample
    sample_id: int  # the sample it holds now (a substitute after a substitution)
    draw_id: int
    data: np.ndarray | None  # its encoded bytes; None: nothing usable (the row is dropped)
    reason: str | None = None  # why the row's own sample could not be used
    candidates: Iterator[tuple[int, int]] | None = None  # substitutes not tried yet
    decoded: bool = False  # known to decode (checked alone after a batch failed)


@dataclass(eq=False)
class StartedBatch:
    """A batch `Augmenter.start` read and handed to DALI; `Augmenter.finish` completes it."""

    seed: int
    epoch: int
    slots: list[_Slot]  # every row of the batch
    params: BatchParams | None  # of the rows holding a sample; None: nothing to augment
    result: np.ndarray | PipelineError | None = field(default=None, repr=False)


class Augmenter:
    """Runs batches of one dataset through one pipeline (one spec, one device)."""

    def __init__(
        self,
        index: DatasetIndex,
        spec: AugmentSpec,
        stats: DatasetStats,
        *,
        max_batch_size: int,
        device: str = "cpu",
        num_threads: int | None = None,
        device_id: int | None = None,
        io_threads: int = 8,
    ) -> None:
        self.index, self.spec, self.stats = index, spec.validate(), stats
        self.pipeline = AugmentPipeline(
            spec,
            max_batch_size=max_batch_size,
            device=device,
            num_threads=num_threads,
            device_id=device_id,
            mean=stats.mean,
            std=stats.std,
        )
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="augsvc-read")
        self._in_flight: deque[StartedBatch] = deque()  # submitted, result not collected

    def close(self) -> None:
        """Stop the file-reading threads."""
        self._io.shutdown(wait=False, cancel_futures=True)

    def params(
        self, seed: int, epoch: int, sample_ids: np.ndarray, draw_ids: np.ndarray
    ) -> BatchParams:
        """The parameters these samples get in (seed, epoch)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        return draw_params(
            self.spec, seed, epoch, draw_ids,
            self.index.heights[ids], self.index.widths[ids],
            self.stats.pca_basis() if self.spec.pca else None,
        )

    def run_batch(self, seed: int, epoch: int, batch: Batch) -> AugmentedBatch:
        """Augment one batch of an `EpochPlan`."""
        return self.run(seed, epoch, batch.sample_ids, batch.draw_ids)

    def run(
        self, seed: int, epoch: int, sample_ids: Sequence[int], draw_ids: Sequence[int]
    ) -> AugmentedBatch:
        """Read, augment and return these samples (corrupt ones substituted or dropped, and
        reported, as `spec.corrupt` says)."""
        return self.finish(self.start(seed, epoch, sample_ids, draw_ids))

    def start(
        self, seed: int, epoch: int, sample_ids: Sequence[int], draw_ids: Sequence[int]
    ) -> StartedBatch:
        """Read these samples (finding stand-ins for unreadable ones) and submit them to the
        pipeline; `finish` returns the result."""
        ids = np.asarray(sample_ids, dtype=np.int64).tolist()
        draws = np.asarray(draw_ids, dtype=np.int64).tolist()
        slots = []
        for i, d, (data, reason) in zip(ids, draws, self._io.map(self._read, ids), strict=True):
            slot = _Slot(i, i, d, data)
            if reason is not None:
                self._reject(seed, epoch, slot, reason)
            slots.append(slot)
        live = _live(slots)
        params = self._params_of(seed, epoch, live) if live else None
        started = StartedBatch(seed, epoch, slots, params)
        if params is not None:
            self.pipeline.submit([s.data for s in live], params)
            self._in_flight.append(started)
        return started

    def finish(self, started: StartedBatch) -> AugmentedBatch:
        """The augmented batch `start` began (batches finish in the order they started)."""
        return self._result(started.slots, self._images(started))

    def _read(self, i: int) -> tuple[np.ndarray, str | None]:
        """The file's bytes as a uint8 array, or a reason why they cannot be used."""
        try:
            raw = self.index.read(i)
        except FileRefused as exc:
            return np.empty(0, np.uint8), str(exc)
        return np.frombuffer(raw, dtype=np.uint8), check_encoded(raw)

    def _params_of(self, seed: int, epoch: int, live: list[_Slot]) -> BatchParams:
        """The parameters of the samples these rows hold now."""
        return self.params(seed, epoch, np.array([s.sample_id for s in live], dtype=np.int64),
                           np.array([s.draw_id for s in live], dtype=np.int64))

    def _reject(self, seed: int, epoch: int, slot: _Slot, reason: str) -> None:
        """The slot's current sample is unusable: move to the next usable substitute, or
        leave the slot empty (dropped)."""
        slot.data, slot.decoded = None, False
        if slot.reason is None:  # the row's own sample
            slot.reason = reason
            if self.spec.corrupt == "substitute":
                subs, sub_draws = substitutes(seed, epoch, slot.draw_id, len(self.index))
                slot.candidates = zip(subs.tolist(), sub_draws.tolist(), strict=True)
        for sample_id, draw_id in slot.candidates or ():
            data, why = self._read(sample_id)
            if why is None:
                slot.sample_id, slot.draw_id, slot.data = sample_id, draw_id, data
                return

    def _collect_until(self, started: StartedBatch | None) -> None:
        """Collect the pipeline's results in order up to `started` (None: all in flight)."""
        while self._in_flight and (started is None or started.result is None):
            head = self._in_flight.popleft()
            try:
                head.result = self.pipeline.collect()
            except PipelineError as exc:
                head.result = exc

    def _images(self, started: StartedBatch) -> np.ndarray:
        """The batch's images; if DALI rejected it, `_recover` them."""
        if started.params is None:
            return self._empty()
        if started.result is None and started not in self._in_flight:
            raise RuntimeError("finish() of a batch that was finished already")
        self._collect_until(started)
        result, started.result = started.result, None
        if not isinstance(result, PipelineError):
            return result
        log.info("batch failed in DALI; retrying its %d samples one by one",
                 len(_live(started.slots)))
        self._collect_until(None)  # the retries run alone: nothing else in flight
        return self._recover(started)

    def _recover(self, started: StartedBatch) -> np.ndarray:
        """DALI rejected the batch: run its samples one by one, reject those it cannot
        decode (their rows move to substitutes, which are checked the same way) and run
        the rest, until the batch runs."""
        seed, epoch, slots, params = started.seed, started.epoch, started.slots, started.params
        while True:
            failed = False
            for j, slot in enumerate(_live(slots)):
                if slot.decoded:
                    continue
                try:
                    self.pipeline.run([slot.data], _take(params, [j]))
                    slot.decoded = True
                except PipelineError as exc:
                    failed = True
                    self._reject(seed, epoch, slot, f"decode failed: {_first_line(exc)}")
            live = _live(slots)
            if not live:
                return self._empty()
            params = self._params_of(seed, epoch, live)
            try:
                return self.pipeline.run([s.data for s in live], params)
            except PipelineError:
                if not failed:  # every sample decodes alone: not something a sample did
                    raise
                log.info("batch failed in DALI again; retrying its %d samples", len(live))

    def _result(self, slots: list[_Slot], images: np.ndarray) -> AugmentedBatch:
        """The batch of the rows that hold a sample, and what was dropped or substituted."""
        paths, rel = self.index.paths, self.index.relpath
        ids: list[int] = []
        draws: list[int] = []
        dropped, substituted = [], []
        for slot in slots:
            if slot.data is None:
                why = slot.reason if slot.candidates is None else (
                    f"{slot.reason}; no usable substitute in {SUBSTITUTE_ATTEMPTS} tries")
                dropped.append(DroppedSample(slot.own_id, rel(slot.own_id), why))
                log.log(_once(paths[slot.own_id]), "dropped sample %d (%s): %s", slot.own_id,
                        paths[slot.own_id], why)
                continue
            if slot.reason is not None:
                substituted.append(Substitution(len(ids), slot.own_id, rel(slot.own_id),
                                                slot.reason, slot.sample_id))
                log.log(_once(paths[slot.own_id]), "sample %d (%s) replaced by sample %d: %s",
                        slot.own_id, paths[slot.own_id], slot.sample_id, slot.reason)
            ids.append(slot.sample_id)
            draws.append(slot.draw_id)
        sample_ids = np.array(ids, dtype=np.int64)
        return AugmentedBatch(
            images=images,
            labels=self.index.labels[sample_ids],
            sample_ids=sample_ids,
            draw_ids=np.array(draws, dtype=np.int64),
            dropped=tuple(sorted(dropped, key=lambda d: d.sample_id)),
            substituted=tuple(substituted),
        )

    def _empty(self) -> np.ndarray:
        """A zero-sample batch of the output shape and dtype."""
        h, w = self.spec.size
        shape = (0, 3, h, w) if self.spec.layout == "NCHW" else (0, h, w, 3)
        return np.empty(shape, dtype=self.spec.dtype)


def _live(slots: list[_Slot]) -> list[_Slot]:
    """The rows that hold a sample."""
    return [s for s in slots if s.data is not None]


def _once(path: str) -> int:
    """WARNING the first time a file's trouble is logged in this process, then DEBUG."""
    if path in _warned:
        return logging.DEBUG
    _warned.add(path)
    return logging.WARNING


def _take(params: BatchParams, rows: list[int]) -> BatchParams:
    """The parameters of a subset of the batch."""
    return BatchParams(**{k: v[rows] for k, v in params.__dict__.items()})


def _first_line(exc: Exception) -> str:
    """DALI errors carry a traceback; keep the first line of what it "encountered"."""
    text = str(exc)
    text = text.split("encountered:", 1)[-1]
    lines = [ln.strip().rstrip(" :") for ln in text.splitlines() if ln.strip()]
    return (lines or ["unknown error"])[0][:300]
