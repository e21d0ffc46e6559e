"""The loader's arithmetic and resume state: batches per epoch, state dicts, integer checks.

A state (`AugmentLoader.state_dict()`) names the run (dataset, spec, seed, sharding,
tail, balance) and where it stands (epoch, next batch); a state from another run is
refused rather than silently resuming the wrong data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from augsvc.core.sampling import rank_batches

__all__ = ["IDENTITY", "STATE_FORMAT", "U32", "U64", "check_int", "check_state", "num_batches"]

STATE_FORMAT = "augsvc-loader/1"
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
# fields of a state that must match the loader it is loaded into
IDENTITY = ("dataset", "spec", "seed", "batch_size", "rank", "world_size", "tail", "balance")


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
