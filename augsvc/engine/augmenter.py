"""The augmentation engine: dataset + spec + statistics + DALI pipeline -> augmented batches.

`Augmenter.run(seed, epoch, sample_ids, draw_ids)` reads the files (thread pool),
draws the batch's parameters (`augsvc.core.sampling`), runs the pipeline and returns an
`AugmentedBatch`. The server and the in-process benchmark both use it, so what a
trainer receives over the wire is exactly what this returns. `start` and `finish` are
the two halves of `run`: several batches may be started before the first is finished
(finished in the order started), so files are read and results encoded while DALI runs.

Corrupt-image policy (see `augsvc.engine.dataset`): a sample whose bytes fail
`check_encoded`, or that DALI cannot decode, is DROPPED from its batch and listed in
`AugmentedBatch.dropped` with its path and the reason; the batch is then shorter.
Nothing is substituted. Limit: damage inside the entropy-coded data of a JPEG whose
structure is intact is repaired by libjpeg with a warning ("Corrupt JPEG data"), not
an error, so such an image is decoded with artefacts, as every JPEG decoder would.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from augsvc.core.sampling import Batch, BatchParams, draw_params
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.core.types import DroppedSample
from augsvc.engine.dataset import DatasetIndex, check_encoded
from augsvc.engine.pipeline import AugmentPipeline, PipelineError

__all__ = ["AugmentedBatch", "Augmenter", "DroppedSample", "StartedBatch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentedBatch:
    """One finished batch; `images[i]` is sample `sample_ids[i]` with label `labels[i]`."""

    images: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    draw_ids: np.ndarray
    dropped: tuple[DroppedSample, ...] = ()


@dataclass(eq=False)
class StartedBatch:
    """A batch `Augmenter.start` read and handed to DALI; `Augmenter.finish` completes it."""

    ids: np.ndarray  # every sample of the batch
    draws: np.ndarray
    keep: np.ndarray  # bool per sample: read and screened fine
    data: list[np.ndarray]  # encoded bytes of the kept samples
    dropped: list[DroppedSample]  # unreadable or failing the byte screen
    params: BatchParams | None  # None: nothing left to augment
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
        """Read, augment and return these samples (corrupt ones dropped and reported)."""
        return self.finish(self.start(seed, epoch, sample_ids, draw_ids))

    def start(
        self, seed: int, epoch: int, sample_ids: Sequence[int], draw_ids: Sequence[int]
    ) -> StartedBatch:
        """Read these samples and submit them to the pipeline; `finish` returns the result."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        draws = np.asarray(draw_ids, dtype=np.int64)
        encoded = list(self._io.map(self._read, ids.tolist()))
        dropped = [
            DroppedSample(int(i), self.index.paths[i], reason)
            for i, (_, reason) in zip(ids, encoded, strict=True) if reason
        ]
        keep = np.array([reason is None for _, reason in encoded], dtype=bool)
        data = [d for d, reason in encoded if reason is None]
        params = self.params(seed, epoch, ids[keep], draws[keep]) if data else None
        started = StartedBatch(ids, draws, keep, data, dropped, params)
        if params is not None:
            self.pipeline.submit(data, params)
            self._in_flight.append(started)
        return started

    def finish(self, started: StartedBatch) -> AugmentedBatch:
        """The augmented batch `start` began (batches finish in the order they started)."""
        ids, draws, keep, dropped = started.ids, started.draws, started.keep, started.dropped
        images, failed = self._result(started)
        if failed:
            kept_ids = ids[keep]
            dropped += [DroppedSample(int(kept_ids[j]), self.index.paths[kept_ids[j]], why)
                        for j, why in failed.items()]
            keep[np.flatnonzero(keep)[list(failed)]] = False
        for d in dropped:
            log.warning("dropped sample %d (%s): %s", d.sample_id, d.path, d.reason)
        return AugmentedBatch(
            images=images,
            labels=self.index.labels[ids[keep]],
            sample_ids=ids[keep],
            draw_ids=draws[keep],
            dropped=tuple(sorted(dropped, key=lambda d: d.sample_id)),
        )

    def _read(self, i: int) -> tuple[np.ndarray, str | None]:
        """The file's bytes as a uint8 array, or a reason why they cannot be used."""
        try:
            raw = self.index.read(i)
        except OSError as exc:
            return np.empty(0, np.uint8), f"unreadable: {exc}"
        return np.frombuffer(raw, dtype=np.uint8), check_encoded(raw)

    def _collect_until(self, started: StartedBatch | None) -> None:
        """Collect the pipeline's results in order up to `started` (None: all in flight)."""
        while self._in_flight and (started is None or started.result is None):
            head = self._in_flight.popleft()
            try:
                head.result = self.pipeline.collect()
            except PipelineError as exc:
                head.result = exc

    def _result(self, started: StartedBatch) -> tuple[np.ndarray, dict[int, str]]:
        """The batch's images; if DALI rejected it, find the bad samples one by one."""
        if started.params is None:
            return self._empty(), {}
        self._collect_until(started)
        result, started.result = started.result, None
        if result is None:
            raise RuntimeError("finish() of a batch that was finished already")
        if not isinstance(result, PipelineError):
            return result, {}
        log.info("batch failed in DALI; retrying its %d samples one by one", len(started.data))
        self._collect_until(None)  # the retries run alone: nothing else in flight
        data, params = started.data, started.params
        failed: dict[int, str] = {}
        for j in range(len(data)):
            try:
                self.pipeline.run([data[j]], _take(params, [j]))
            except PipelineError as exc:
                failed[j] = f"decode failed: {_first_line(exc)}"
        good = [j for j in range(len(data)) if j not in failed]
        if not good:
            return self._empty(), failed
        return self.pipeline.run([data[j] for j in good], _take(params, good)), failed

    def _empty(self) -> np.ndarray:
        """A zero-sample batch of the output shape and dtype."""
        h, w = self.spec.size
        shape = (0, 3, h, w) if self.spec.layout == "NCHW" else (0, h, w, 3)
        return np.empty(shape, dtype=self.spec.dtype)


def _take(params: BatchParams, rows: list[int]) -> BatchParams:
    """The parameters of a subset of the batch."""
    return BatchParams(**{k: v[rows] for k, v in params.__dict__.items()})


def _first_line(exc: Exception) -> str:
    """DALI errors carry a traceback; keep the first line of what it "encountered"."""
    text = str(exc)
    text = text.split("encountered:", 1)[-1]
    lines = [ln.strip().rstrip(" :") for ln in text.splitlines() if ln.strip()]
    return (lines or ["unknown error"])[0][:300]
