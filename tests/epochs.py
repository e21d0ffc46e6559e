"""Reference epochs from the in-process engine, and the per-batch digest loaders are compared by.

`engine_batches` is what a loader must deliver, batch by batch: the same dataset, spec,
seed and sharding run through `augsvc.engine.Augmenter` in this process. `batch_record`
is one batch as a JSON-able dict (epoch, index, sample ids, labels, sha256 of the pixels),
so a loader running in another process (tests/netns_trainer.py) can write what it got
and a test compare it with `engine_records` without shipping the pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from augsvc.core.spec import AugmentSpec


def digest(images: np.ndarray) -> str:
    """sha256 of a batch's pixels, its dtype and shape included."""
    h = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def batch_record(epoch: int, index: int, sample_ids: np.ndarray, labels: np.ndarray,
                 images: np.ndarray) -> dict[str, Any]:
    """One delivered batch as a JSON-able dict."""
    return {"epoch": int(epoch), "index": int(index),
            "sample_ids": [int(i) for i in sample_ids], "labels": [int(x) for x in labels],
            "sha256": digest(images)}


def engine_batches(dataset: Path, spec: AugmentSpec, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1, batch_size: int = 2) -> list[Any]:
    """Every batch (images, labels, sample_ids) of one rank's epoch, computed by the engine
    in this process on the CPU with ImageNet statistics."""
    from augsvc.core.sampling import EpochPlan
    from augsvc.core.stats import IMAGENET
    from augsvc.engine.augmenter import Augmenter
    from augsvc.engine.dataset import open_dataset

    index = open_dataset(dataset)
    augmenter = Augmenter(index, spec, IMAGENET, max_batch_size=batch_size, device="cpu",
                          num_threads=1)
    try:
        plan = EpochPlan(len(index), batch_size, seed, epoch, rank, world_size)
        return [augmenter.run_batch(seed, epoch, plan.batch(k)) for k in range(len(plan))]
    finally:
        augmenter.close()


def engine_records(dataset: Path, spec: AugmentSpec, seed: int, epoch: int,
                   batch_size: int) -> list[dict[str, Any]]:
    """`batch_record` of every batch of `engine_batches` (rank 0 of 1)."""
    return [batch_record(epoch, k, b.sample_ids, b.labels, b.images)
            for k, b in enumerate(engine_batches(dataset, spec, seed, epoch,
                                                 batch_size=batch_size))]


def assert_same_epoch(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """`got` (a loader's records) is `want` exactly: every batch once, in order, same bytes."""
    indices = [r["index"] for r in got]
    missing = sorted(set(range(len(want))) - set(indices))
    duplicated = sorted({i for i in indices if indices.count(i) > 1})
    assert indices == list(range(len(want))), (
        f"{len(got)} batches delivered for an epoch of {len(want)}: missing {missing}, "
        f"duplicated {duplicated}, order {indices}")
    for g, w in zip(got, want, strict=True):
        assert g == w, f"batch {w['index']} differs from the engine's: got {g}, want {w}"
