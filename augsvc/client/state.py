"""The loader's arithmetic and position: batches per rank, which epoch a pass runs, resume state.

* `num_batches`: one rank's batches per epoch (`augsvc.core.sampling.Sharding` deals them).
* `Position`: the epoch and next batch; which epoch the next pass runs (the next one,
  unless one was chosen); the state dict that resumes it exactly.

A state (`AugmentLoader.state_dict()`) names the run (dataset, spec, seed, sharding,
tail, shuffle, balance) and where it stands (epoch, next batch); a state from another run
is refused rather than silently resuming the wrong data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from augsvc.core.sampling import rank_batches

__all__ = ["IDENTITY", "STATE_FORMAT", "U32", "U64", "Position", "check_int", "check_state",
           "num_batches"]

STATE_FORMAT = "augsvc-loader/1"
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
# fields of a state that must match the loader it is loaded into
IDENTITY = ("dataset", "spec", "seed", "batch_size", "rank", "world_size", "tail", "shuffle",
            "balance")
DEFAULTS = {"shuffle": True}  # fields that states saved before they existed lack


def num_batches(
    num_samples: int,
    batch_size: int,
    world_size: int = 1,
    tail: str = "drop_last",
    class_counts: Sequence[int] | None = None,
    rank: int = 0,
) -> int:
    """Batches rank `rank` gets per epoch, as `EpochPlan` deals them (`rank_batches`).

    With `class_counts` (balance=True), every class present is up-sampled to the largest.
    ValueError when not even one round of batch_size x world_size samples exists (drop_last).
    """
    return rank_batches(num_samples, batch_size, world_size, rank, tail, class_counts)


class Position:
    """Where a loader stands, and which epoch its next pass runs.

    A pass runs `epoch + 1` unless an epoch was chosen since the last pass began: by the
    constructor, `choose` (set_epoch) or `load` (load_state_dict), which run `epoch`. A
    loaded state resumes at its batch; one saved after the last batch of its epoch
    resumes with the next epoch, as the run that saved it would have gone on, unless
    `choose` names that epoch again (its pass is then empty: the epoch is done).
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.next_batch = 0  # the next batch to yield in `epoch`
        self.chosen = True  # the next pass runs `epoch` (else epoch + 1)
        self.named = False  # `choose` named the epoch of a loaded resume point
        self.resume: int | None = None  # the first batch of the next pass, from `load`

    def choose(self, epoch: int) -> None:
        """The next pass runs `epoch` (a loaded resume point in it is kept)."""
        check_int("epoch", epoch, 0, U64)
        if epoch != self.epoch:
            self.resume = None
        self.epoch, self.next_batch, self.chosen = epoch, self.resume or 0, True
        self.named = self.resume is not None

    def load(self, epoch: int, next_batch: int) -> None:
        self.epoch, self.next_batch, self.resume = epoch, next_batch, next_batch
        self.chosen, self.named = True, False

    def begin(self, batches: int) -> int:
        """Start a pass over epochs of `batches` batches: its first batch (sets `epoch`)."""
        resume = self.resume
        if resume is not None and resume > batches:
            raise ValueError(f"resume point batch {resume} is past the epoch's {batches} batches")
        finished = resume == batches and not self.named  # a state saved at its epoch's end
        if finished or not self.chosen:
            if self.epoch == U64:
                raise ValueError(f"epoch {U64} was the last one")
            self.epoch, resume = self.epoch + 1, 0
        self.next_batch = resume or 0
        self.chosen, self.named, self.resume = False, False, None
        return self.next_batch

    def advance(self, epoch: int, batch: int) -> None:
        """Batch `batch` of `epoch` was yielded."""
        self.epoch, self.next_batch = epoch, batch + 1

    def state(self) -> tuple[int, int]:
        """(epoch, next batch) to save: loaded into a fresh loader, its next pass is this
        loader's next pass (from a loaded state, or mid-pass, the rest of the epoch)."""
        return self.epoch, self.next_batch


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """TypeError unless `value` is an integer (not a bool); ValueError outside [low, high]."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_state(state: Any, mine: dict[str, Any]) -> tuple[int, int]:
    """(epoch, next batch) of `state`, after checking it is a state of the run `mine` describes."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not an AugmentLoader state (expected format {STATE_FORMAT!r})")
    state = {**DEFAULTS, **state}
    missing = [k for k in (*IDENTITY, "epoch", "next_batch") if k not in state]
    if missing:
        raise ValueError(f"the state lacks {', '.join(missing)}")
    for key in IDENTITY:
        if state[key] != mine[key]:
            raise ValueError(f"the state is for {key}={state[key]!r}, this loader has "
                             f"{key}={mine[key]!r}: it cannot resume another run")
    check_int("epoch", state["epoch"], 0, U64)
    check_int("next_batch", state["next_batch"], 0, U32 + 1)
    return state["epoch"], state["next_batch"]
