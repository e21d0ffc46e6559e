"""Which samples each rank gets, batch by batch, as pure functions of (seed, epoch).

* `EpochOrder`: the epoch order from (seed, epoch), shuffled or not, optionally class
  balanced; O(dataset) memory, shared by every rank and sharding of the epoch.
* `Sharding`, `rank_batches`: how the order is dealt out to ranks in batches (tails
  drop_last, pad, keep); `EpochPlan`: one rank's batches, computed when asked for.
* `substitutes`: the deterministic stand-ins for a sample that cannot be used.

A sample's draw id, the key of its random parameters (`augsvc.core.draws`), is its
dataset index, plus `occurrence * num_samples` when it appears more than once in an
epoch (class balancing, padding), so repeats are augmented differently; a substitute's
is negative. Draw ids depend on the position in the epoch order only: not on batch
size, world size, rank, server or stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from augsvc.core.draws import uniforms

__all__ = [
    "MAX_ROUND",
    "SUBSTITUTE_ATTEMPTS",
    "TAILS",
    "Batch",
    "EpochOrder",
    "EpochPlan",
    "Sharding",
    "epoch_length",
    "rank_batches",
    "substitutes",
]

TAILS = ("drop_last", "pad", "keep")
MAX_ROUND = 1 << 40  # batch_size x world_size: more is refused (and could overflow draw ids)
SUBSTITUTE_ATTEMPTS = 8  # substitutes tried for one corrupt sample before it is dropped

_SUBSTITUTE = 5  # the `uniforms` stream of substitutes (1-4 are augsvc.core.draws')
_MASK64 = (1 << 64) - 1
_MAX_SUBSTITUTED = (1 << 63) // SUBSTITUTE_ATTEMPTS - 1


@dataclass(frozen=True)
class Batch:
    """One batch of a rank's plan: which samples, and the draw id of each."""

    index: int
    sample_ids: np.ndarray  # (B,) int64 dataset indices
    draw_ids: np.ndarray  # (B,) int64 keys for `draw_params`


def epoch_length(num_samples: int, class_counts: Sequence[int] | None = None) -> int:
    """Entries in an epoch's order: `num_samples`, or with class balancing (`class_counts`,
    balance=True) every class present up-sampled to the largest one."""
    if class_counts is None:
        return num_samples
    present = [int(c) for c in class_counts if c > 0]
    return max(present) * len(present) if present else 0


@dataclass(frozen=True)
class Sharding:
    """How an epoch order of `length` entries is dealt out to ranks, batch by batch.

    The order is dealt in rounds of batch_size x world_size positions: rank r's batch k
    is positions [(k * world_size + r) * batch_size, + batch_size). The last incomplete
    round: `tail="drop_last"` drops it (each sample at most once, every rank the same
    number of batches); `"pad"` completes it with positions past the end, which wrap
    around the order (each sample at least once, same counts); `"keep"` keeps it,
    clipped to `length` (each sample exactly once; a rank may get one batch fewer than
    another, and the epoch's very last batch may be short).
    """

    length: int
    batch_size: int
    world_size: int = 1
    tail: str = "drop_last"

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError("the dataset has no samples")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.per_round > MAX_ROUND:
            raise ValueError(f"batch_size x world_size = {self.per_round} is over the limit of "
                             f"2^{MAX_ROUND.bit_length() - 1} = {MAX_ROUND} samples per round")
        if self.tail == "drop_last" and self.length < self.per_round:
            raise ValueError(f"{self.length} samples are fewer than one round of batch_size x "
                             f"world_size = {self.per_round}; use tail='pad' or tail='keep'")

    @property
    def per_round(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self, rank: int) -> int:
        """Batches rank `rank` gets."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={self.world_size}")
        full, rest = divmod(self.length, self.per_round)
        if self.tail == "drop_last":
            return full
        if self.tail == "pad":
            return full + (rest > 0)
        return full + (rest > rank * self.batch_size)

    def span(self, k: int, rank: int) -> tuple[int, int]:
        """Positions [start, stop) of rank `rank`'s batch k (IndexError out of range)."""
        n = self.num_batches(rank)
        if not 0 <= k < n:
            raise IndexError(f"batch {k} out of range [0, {n})")
        start = (k * self.world_size + rank) * self.batch_size
        stop = start + self.batch_size
        return start, min(stop, self.length) if self.tail == "keep" else stop


def rank_batches(
    num_samples: int,
    batch_size: int,
    world_size: int,
    rank: int,
    tail: str,
    class_counts: Sequence[int] | None = None,
) -> int:
    """Batches rank `rank` gets per epoch, as `EpochPlan` deals them (ValueError when the
    request cannot be dealt, e.g. fewer samples than one round with drop_last).

    With `class_counts` (balance=True), every class present is up-sampled to the largest.
    """
    sharding = Sharding(epoch_length(num_samples, class_counts), batch_size, world_size, tail)
    return sharding.num_batches(rank)


@dataclass(frozen=True, eq=False)
class EpochOrder:
    """The order of an epoch's samples for (seed, epoch): what every rank's plan deals from.

    Memory is O(entries) (4 bytes each for datasets under 2^31 samples, 4 more with
    class balancing) and does not depend on batch size, world size or tail: positions
    past the end (tail "pad") are computed by `take`, never stored.
    """

    num_samples: int
    sample_ids: np.ndarray  # (L,) dataset indices in epoch order
    occurrence: np.ndarray | None  # (L,) earlier entries of the same sample; None: all 0
    max_occurrence: int

    @classmethod
    def build(
        cls,
        num_samples: int,
        seed: int,
        epoch: int,
        labels: Sequence[int] | np.ndarray | None = None,
        balance: bool = False,
        shuffle: bool = True,
    ) -> EpochOrder:
        """The order of (seed, epoch); `shuffle=False` keeps dataset order (a sample's repeats,
        with `balance`, next to each other). With `balance=True` every class is up-sampled
        to the size of the largest one (`labels` needed)."""
        if num_samples < 1:
            raise ValueError("the dataset has no samples")
        if balance and labels is None:
            raise ValueError("balance=True needs the labels")
        key = np.array([seed & _MASK64, epoch & _MASK64], dtype=np.uint64)  # exact
        rng = np.random.Generator(np.random.Philox(key=key))
        occurrence = None
        if balance:
            sample_ids, occurrence = _balanced(np.asarray(labels), rng)
        else:
            sample_ids = np.arange(num_samples, dtype=np.int64)
        if shuffle:
            perm = rng.permutation(len(sample_ids))
        else:
            perm = None if occurrence is None else np.argsort(sample_ids, kind="stable")
        if perm is not None:
            sample_ids = sample_ids[perm]
            occurrence = None if occurrence is None else occurrence[perm]
        top = 0 if occurrence is None else int(occurrence.max())
        sample_ids = sample_ids.astype(_id_dtype(num_samples))
        occurrence = None if top == 0 else occurrence.astype(np.int32)
        for shared in (sample_ids, occurrence):  # read by every stream's producer thread
            if shared is not None:
                shared.flags.writeable = False
        return cls(num_samples, sample_ids, occurrence, top)

    @staticmethod
    def nbytes_for(num_samples: int, length: int, balance: bool) -> int:
        """The most memory `build` keeps for an order of `length` entries."""
        return length * (np.dtype(_id_dtype(num_samples)).itemsize + (4 if balance else 0))

    @property
    def nbytes(self) -> int:
        return self.sample_ids.nbytes + (0 if self.occurrence is None else self.occurrence.nbytes)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, draw ids) of positions [start, stop), int64.

        A position p past the end is entry p mod L again, as one more occurrence per
        wrap (after every occurrence of the order itself), so its draw id is new.
        """
        pos = np.arange(start, stop, dtype=np.int64)
        length = len(self)
        at = pos % length
        ids = self.sample_ids[at].astype(np.int64)
        occurrence = (np.zeros(len(pos), np.int64) if self.occurrence is None
                      else self.occurrence[at].astype(np.int64))
        wrapped = pos >= length
        occurrence[wrapped] += self.max_occurrence + 1 + (pos[wrapped] - length) // length
        return ids, ids + occurrence * self.num_samples


class EpochPlan:
    """Rank `rank`'s batches of the epoch order for (seed, epoch) (see `Sharding`).

    A sample's draw id is its dataset index plus `occurrence * num_samples`, so repeats
    (balance, tail "pad") are augmented differently. `EpochPlan.from_order` makes plans
    of any sharding from one shared `EpochOrder`; a batch is computed when asked for.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        tail: str = "drop_last",
        labels: Sequence[int] | np.ndarray | None = None,
        balance: bool = False,
        *,
        shuffle: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        order = EpochOrder.build(num_samples, seed, epoch, labels, balance, shuffle)
        self._setup(order, Sharding(len(order), batch_size, world_size, tail), rank)

    @classmethod
    def from_order(cls, order: EpochOrder, sharding: Sharding, rank: int = 0) -> EpochPlan:
        """The plan of rank `rank` dealing `order` as `sharding` says (no copy of the order)."""
        if sharding.length != len(order):
            raise ValueError(f"the sharding is for {sharding.length} entries, the order has "
                             f"{len(order)}")
        plan = cls.__new__(cls)
        plan._setup(order, sharding, rank)
        return plan

    def _setup(self, order: EpochOrder, sharding: Sharding, rank: int) -> None:
        self.order, self.sharding = order, sharding
        self.num_samples, self.batch_size = order.num_samples, sharding.batch_size
        self.rank, self.world_size = rank, sharding.world_size
        self.num_batches = sharding.num_batches(rank)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int, rank: int | None = None) -> Batch:
        """Batch number k (0-based) of this plan's rank, or of `rank` (same epoch order)."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range [0, {self.world_size})")
        sample_ids, draw_ids = self.order.take(*self.sharding.span(k, rank))
        return Batch(k, sample_ids, draw_ids)


def substitutes(
    seed: int, epoch: int, draw_id: int, num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """The substitutes to try, in order, for the sample of draw `draw_id` when it cannot be
    used (corrupt image): (sample ids, draw ids), `SUBSTITUTE_ATTEMPTS` of each.

    A pure function of (seed, epoch, draw id), hence of the sample's position in the
    epoch: the same on every server. Attempt a's draw id is `-1 - (draw_id *
    SUBSTITUTE_ATTEMPTS + a)`: negative, so distinct from every ordinary draw id and
    from every other substitute's, and the substitute is augmented as a draw of its own.
    Its sample is uniform over the dataset (it may be the corrupt sample itself, which
    the caller then skips like any other unusable candidate).
    """
    if not 0 <= draw_id < _MAX_SUBSTITUTED:
        raise ValueError(f"draw id {draw_id} cannot be substituted (need 0 <= id < "
                         f"{_MAX_SUBSTITUTED})")
    draws = -1 - (draw_id * SUBSTITUTE_ATTEMPTS + np.arange(SUBSTITUTE_ATTEMPTS, dtype=np.int64))
    u = uniforms(seed, epoch, draws, _SUBSTITUTE, 1)[:, 0]
    return np.minimum((u * num_samples).astype(np.int64), num_samples - 1), draws


def _id_dtype(num_samples: int) -> type[np.signedinteger]:
    return np.int32 if num_samples <= np.iinfo(np.int32).max else np.int64


def _balanced(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every class repeated up to the largest class's count; (sample ids, occurrence)."""
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    target = max(len(m) for m in members)
    ids, occ = [], []
    for m in members:
        full, rest = divmod(target, len(m))
        ids.append(np.tile(m, full))
        occ.append(np.repeat(np.arange(full), len(m)))
        if rest:
            ids.append(np.sort(rng.choice(m, size=rest, replace=False)))
            occ.append(np.full(rest, full))
    return np.concatenate(ids).astype(np.int64), np.concatenate(occ).astype(np.int64)
