"""`BatchMeta`: which samples a yielded batch holds, and which were left out or replaced."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augsvc import wire
from augsvc.core.types import DroppedSample, Substitution

__all__ = ["BatchMeta", "batch_meta"]


@dataclass(frozen=True)
class BatchMeta:
    """What a yielded batch holds: row i of the images is dataset sample `sample_ids[i]`."""

    index: int  # this rank's batch number in the epoch
    sample_ids: np.ndarray  # (N,) int64
    draw_ids: np.ndarray  # (N,) int64 keys of the samples' random parameters
    dropped: tuple[DroppedSample, ...] = ()
    substituted: tuple[Substitution, ...] = ()  # corrupt samples whose rows hold a stand-in
    stats_source: str = ""  # the statistics the server used: "dataset" or "imagenet"
    stats_digest: str = ""  # their values' fingerprint (`DatasetStats.digest`)


def batch_meta(batch: wire.AssembledBatch) -> BatchMeta:
    """The meta of an assembled batch, from its header."""
    header = batch.header
    return BatchMeta(
        index=header.batch_index,
        sample_ids=batch.sample_ids,
        draw_ids=batch.draw_ids,
        dropped=tuple(DroppedSample(d.sample_id, d.path, d.reason) for d in header.dropped),
        substituted=tuple(Substitution(s.row, s.sample_id, s.path, s.reason, s.substitute_id)
                          for s in header.substituted),
        stats_source=header.stats_source,
        stats_digest=header.stats_digest,
    )
