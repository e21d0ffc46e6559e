"""Sampling: epoch plans and per-sample parameters are pure functions of the seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from augsvc.core.draws import COLOR_PARAMS, draw_params, uniforms
from augsvc.core.sampling import SUBSTITUTE_ATTEMPTS, EpochPlan, rank_batches, substitutes
from augsvc.core.spec import AugmentSpec

BASIS = (np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0],
         np.array([0.2175, 0.0188, 0.0045]))


def _params(spec: AugmentSpec, ids: np.ndarray, seed: int = 7, epoch: int = 2,
            h: int = 375, w: int = 500):
    n = len(ids)
    return draw_params(spec, seed, epoch, ids, np.full(n, h), np.full(n, w), BASIS)


def test_uniforms_are_in_range_and_uncorrelated() -> None:
    u = uniforms(1, 0, np.arange(20000), stream=3, n=4)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    assert not np.array_equal(u, uniforms(2, 0, np.arange(20000), stream=3, n=4))
    assert not np.array_equal(u, uniforms(1, 1, np.arange(20000), stream=3, n=4))


def test_params_do_not_depend_on_batch_position_or_size() -> None:
    spec = AugmentSpec()
    ids = np.arange(64)
    whole = _params(spec, ids)
    rng = np.random.default_rng(0)
    for size in (1, 7, 64):
        pick = rng.permutation(64)[:size]
        part = _params(spec, ids[pick])
        for name, values in whole.__dict__.items():
            np.testing.assert_array_equal(getattr(part, name), values[pick], err_msg=name)


def test_params_follow_the_distributions() -> None:
    spec = AugmentSpec()
    p = _params(spec, np.arange(20000))
    assert abs(p.flip_h.mean() - 0.5) < 0.02 and not p.flip_v.any()
    for name in ("hue_shift", "sat_shift", "val_shift"):
        v = getattr(p, name)
        assert -0.1 <= v.min() and v.max() <= 0.1 and abs(v.mean()) < 0.005
    for name in ("sat_pow", "val_pow"):  # log-uniform in [0.25, 4]: log2 uniform in [-2, 2]
        lv = np.log2(getattr(p, name))
        assert -2.0001 <= lv.min() and lv.max() <= 2.0001 and abs(lv.mean()) < 0.05
    assert 0.7 <= p.sat_scale.min() and p.sat_scale.max() <= 1.4
    assert abs(p.pca_alpha.std() - 0.1) < 0.005 and abs(p.pca_alpha.mean()) < 0.005
    expect = (p.pca_alpha.astype(np.float64) * BASIS[1]) @ BASIS[0].T * 255
    np.testing.assert_allclose(p.rgb_offset, expect, rtol=1e-5, atol=1e-4)
    m = p.color_matrix()
    assert m.shape == (20000, len(COLOR_PARAMS)) and m.dtype == np.float32


def test_switches_give_identity_params() -> None:
    p = _params(AugmentSpec(hsv=False, pca=False, p_hflip=0.0), np.arange(100))
    ident = np.array([0, 1, 1, 0, 1, 1, 0, 0, 0, 0], np.float32)
    np.testing.assert_array_equal(p.color_matrix(), np.tile(ident, (100, 1)))
    assert not p.flip_h.any()
    half = _params(AugmentSpec(p_hsv=0.5), np.arange(4000))
    assert abs((half.hue_shift == 0).mean() - 0.5) < 0.03


def test_pca_without_basis_is_an_error() -> None:
    with pytest.raises(ValueError, match="PCA basis"):
        draw_params(AugmentSpec(), 0, 0, np.arange(2), np.full(2, 10), np.full(2, 10))


def test_random_resized_crop_windows_are_valid() -> None:
    spec = AugmentSpec()
    h, w = 375, 500
    roi = _params(spec, np.arange(5000), h=h, w=w).roi.astype(np.float64)
    ch, cw = roi[:, 2] - roi[:, 0], roi[:, 3] - roi[:, 1]
    assert (roi[:, :2] >= 0).all() and (roi[:, 2] <= h).all() and (roi[:, 3] <= w).all()
    assert np.array_equal(roi, np.rint(roi))  # integer windows, like torchvision
    area = ch * cw / (h * w)
    assert area.min() >= 0.08 * 0.95 and area.max() <= 1.0
    ratio = cw / ch
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= 4 / 3 * 1.03


def test_random_resized_crop_falls_back_to_a_centre_crop() -> None:
    # a 1000x10 strip: no try fits the ratio range, so the centre crop clamped to 4/3 is used
    roi = _params(AugmentSpec(scale=(0.9, 1.0)), np.arange(50), h=10, w=1000).roi
    np.testing.assert_array_equal(roi, np.tile([0, 493, 10, 506], (50, 1)))


@pytest.mark.parametrize("mode", ["random_crop", "center_crop"])
def test_resize_then_crop_windows(mode: str) -> None:
    spec = AugmentSpec(crop=mode, size=(224, 224), resize=256)
    h, w = 300, 400
    roi = _params(spec, np.arange(2000), h=h, w=w).roi.astype(np.float64)
    s = 256 / 300
    np.testing.assert_allclose(roi[:, 2] - roi[:, 0], 224 / s, rtol=1e-6)
    np.testing.assert_allclose(roi[:, 3] - roi[:, 1], 224 / s, rtol=1e-6)
    assert (roi >= -1e-4).all() and (roi[:, 2] <= h + 1e-3).all() and (roi[:, 3] <= w + 1e-3).all()
    if mode == "center_crop":
        np.testing.assert_allclose(roi[0], [(h - 224 / s) / 2, (w - 224 / s) / 2,
                                            (h + 224 / s) / 2, (w + 224 / s) / 2], rtol=1e-6)
    else:
        starts = np.rint(roi[:, 1] * s)  # whole pixels of the resized image
        assert starts.min() == 0 and starts.max() == math.floor(400 * s) - 224


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_sample_exactly_once_across_ranks(world: int) -> None:
    n, b = 96, 4
    seen = []
    for rank in range(world):
        plan = EpochPlan(n, b, seed=5, epoch=1, rank=rank, world_size=world)
        assert len(plan) == n // (b * world)
        for k in range(len(plan)):
            batch = plan.batch(k)
            assert len(batch.sample_ids) == b
            np.testing.assert_array_equal(batch.sample_ids, batch.draw_ids)
            seen.extend(batch.sample_ids.tolist())
    assert sorted(seen) == list(range(n))


def test_drop_last_and_pad() -> None:
    n, b, world = 50, 4, 3  # 12 per round: 4 full rounds (48), 2 left over
    drop = [EpochPlan(n, b, 1, 0, rank=r, world_size=world) for r in range(world)]
    ids = np.concatenate([p.batch(k).sample_ids for p in drop for k in range(len(p))])
    assert len(ids) == 48 and len(set(ids.tolist())) == 48
    pad = [EpochPlan(n, b, 1, 0, rank=r, world_size=world, tail="pad") for r in range(world)]
    assert {len(p) for p in pad} == {5}
    batches = [p.batch(k) for p in pad for k in range(len(p))]
    ids = np.concatenate([x.sample_ids for x in batches])
    draws = np.concatenate([x.draw_ids for x in batches])
    assert set(ids.tolist()) == set(range(n)) and len(ids) == 60
    assert len(set(draws.tolist())) == 60  # repeats are augmented differently


def test_order_depends_on_seed_and_epoch_only() -> None:
    a = EpochPlan(100, 10, seed=1, epoch=0).batch(3).sample_ids
    np.testing.assert_array_equal(a, EpochPlan(100, 10, seed=1, epoch=0).batch(3).sample_ids)
    assert not np.array_equal(a, EpochPlan(100, 10, seed=1, epoch=1).batch(3).sample_ids)
    assert not np.array_equal(a, EpochPlan(100, 10, seed=2, epoch=0).batch(3).sample_ids)


def test_class_balancing_upsamples_rare_classes() -> None:
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    plan = EpochPlan(100, 10, seed=3, epoch=0, labels=labels, balance=True)
    ids = np.concatenate([plan.batch(k).sample_ids for k in range(len(plan))])
    draws = np.concatenate([plan.batch(k).draw_ids for k in range(len(plan))])
    assert len(ids) == 270
    assert np.bincount(labels[ids]).tolist() == [90, 90, 90]
    assert len(set(draws.tolist())) == 270
    np.testing.assert_array_equal(draws % 100, ids)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"num_samples": 0}, "no samples"),
    ({"batch_size": 0}, "batch_size"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"tail": "wrap"}, "drop_last, pad, keep"),
    ({"balance": True}, "labels"),
    ({"batch_size": 64}, "tail='pad'"),
])
def test_plan_errors(kwargs: dict, words: str) -> None:
    args = {"num_samples": 10, "batch_size": 2, "seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=words):
        EpochPlan(**args)


def test_one_plan_serves_every_rank() -> None:
    shared = EpochPlan(50, 4, seed=2, epoch=1, world_size=3)
    for rank in range(3):
        own = EpochPlan(50, 4, seed=2, epoch=1, rank=rank, world_size=3)
        for k in range(len(own)):
            np.testing.assert_array_equal(shared.batch(k, rank).sample_ids,
                                          own.batch(k).sample_ids)
    with pytest.raises(IndexError, match="rank 3"):
        shared.batch(0, 3)


def test_params_do_not_depend_on_world_size_or_rank() -> None:
    """A sample's draw id, hence its parameters, is the same in any sharding of the epoch."""
    spec = AugmentSpec()
    n, h, w = 48, np.full(48, 300), np.full(48, 400)
    by_sample: dict[int, np.ndarray] = {}
    for world in (1, 2, 3):
        for rank in range(world):
            plan = EpochPlan(n, 4, seed=9, epoch=5, rank=rank, world_size=world)
            for k in range(len(plan)):
                b = plan.batch(k)
                m = draw_params(spec, 9, 5, b.draw_ids, h[b.sample_ids], w[b.sample_ids],
                                BASIS)
                for sid, row in zip(b.sample_ids.tolist(), np.column_stack(
                        [m.roi, m.color_matrix(), m.flip_h]), strict=True):
                    if sid in by_sample:
                        np.testing.assert_array_equal(row, by_sample[sid])
                    by_sample[sid] = row
    assert len(by_sample) == n


# ---------------------------------------------------------------------------
# lazy plans: the same batches as before, O(dataset) memory


def _legacy_epoch(n, b, seed, epoch, world, tail, labels=None, balance=False):
    """Frozen copy of the EpochPlan of commit 00ffb53, which materialised rounds x B x W
    entries: (sample ids, draw ids) of every position of the epoch."""
    rng = np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), epoch & (2**64 - 1)]))
    if balance:
        sample_ids, occurrence = _legacy_balanced(np.asarray(labels), rng)
    else:
        sample_ids = np.arange(n, dtype=np.int64)
        occurrence = np.zeros(n, dtype=np.int64)
    perm = rng.permutation(len(sample_ids))
    sample_ids, occurrence = sample_ids[perm], occurrence[perm]
    per_round = b * world
    rounds = len(sample_ids) // per_round if tail == "drop_last" else -(-len(sample_ids)
                                                                         // per_round)
    total = rounds * per_round
    extra = total - len(sample_ids)
    if extra > 0:
        wrap = np.arange(extra) % len(sample_ids)
        sample_ids = np.concatenate([sample_ids, sample_ids[wrap]])
        bump = (occurrence.max() + 1 + np.arange(extra) // len(perm))
        occurrence = np.concatenate([occurrence, occurrence[wrap] + bump])
    return rounds, sample_ids[:total], sample_ids[:total] + occurrence[:total] * n


def _legacy_balanced(labels, rng):
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


LEGACY_CASES = [  # n, batch size, world size, tail, balance
    (50, 4, 3, "drop_last", False), (50, 4, 3, "pad", False), (96, 4, 1, "drop_last", False),
    (7, 3, 5, "pad", False), (12, 1024, 3, "pad", False), (1, 1, 1, "pad", False),
    (100, 10, 2, "drop_last", True), (100, 7, 3, "pad", True), (13, 5, 4, "pad", True),
]


@pytest.mark.parametrize(("n", "b", "world", "tail", "balance"), LEGACY_CASES)
@pytest.mark.parametrize("seed", [0, 5, 2**62 + 1])
def test_plans_give_exactly_the_batches_of_the_materialised_plan(n, b, world, tail, balance,
                                                                  seed) -> None:
    labels = np.array([0] * (n - n // 3 - n // 10) + [1] * (n // 3) + [4] * (n // 10))
    epoch = 3
    rounds, want_ids, want_draws = _legacy_epoch(n, b, seed, epoch, world, tail, labels,
                                                 balance)
    plan = EpochPlan(n, b, seed, epoch, 0, world, tail, labels, balance)
    assert len(plan) == rounds
    for rank in range(world):
        for k in range(rounds):
            got = plan.batch(k, rank)
            start = (k * world + rank) * b
            np.testing.assert_array_equal(got.sample_ids, want_ids[start:start + b])
            np.testing.assert_array_equal(got.draw_ids, want_draws[start:start + b])


def test_seeds_past_2_63_give_their_own_orders() -> None:
    # a key list holding an int >= 2^63 went through float64 before: such seeds collided
    orders = {tuple(EpochPlan(50, 50, seed, 0).batch(0).sample_ids.tolist())
              for seed in (2**64 - 1, 2**64 - 2, 2**63, 2**63 + 1)}
    assert len(orders) == 4


def test_a_wide_padded_plan_costs_the_dataset_not_batch_size_x_world_size() -> None:
    # the 45-byte request of issue 9: 12 samples, batch 1024, 16384 ranks, tail pad
    plan = EpochPlan(12, 1024, seed=1, epoch=0, world_size=16384, tail="pad")
    assert plan.order.nbytes == 12 * 4  # not 16.7M entries
    last = plan.batch(0, rank=16383)
    start = 16383 * 1024
    order = plan.order.sample_ids
    np.testing.assert_array_equal(last.sample_ids, order[np.arange(start, start + 1024) % 12])
    assert len(set(last.draw_ids.tolist())) == 1024  # every wrap is a new occurrence
    np.testing.assert_array_equal(last.draw_ids % 12, last.sample_ids)


@pytest.mark.parametrize(("b", "world"), [(1024, 2**32 - 1), (2**20, 2**21)])
def test_rounds_past_the_limit_are_refused(b: int, world: int) -> None:
    with pytest.raises(ValueError, match=r"over the limit of 2\^40"):
        EpochPlan(12, b, seed=0, epoch=0, world_size=world, tail="pad")
    one = EpochPlan(12, 1, seed=0, epoch=0, rank=2**32 - 2, world_size=2**32 - 1, tail="pad")
    assert len(one) == 1 and len(one.batch(0).sample_ids) == 1


# ---------------------------------------------------------------------------
# evaluation order: no shuffle, tail "keep"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 10, 23, 24])
def test_keep_deals_every_sample_exactly_once_in_dataset_order(world: int, n: int) -> None:
    b = 4
    by_position = {}
    for rank in range(world):
        plan = EpochPlan(n, b, seed=3, epoch=2, rank=rank, world_size=world, tail="keep",
                         shuffle=False)
        assert len(plan) == rank_batches(n, b, world, rank, "keep")
        for k in range(len(plan)):
            batch = plan.batch(k)
            start = (k * world + rank) * b
            assert 1 <= len(batch.sample_ids) <= b
            np.testing.assert_array_equal(batch.sample_ids, np.arange(start, min(start + b, n)))
            np.testing.assert_array_equal(batch.draw_ids, batch.sample_ids)
            by_position.update(dict.fromkeys(batch.sample_ids.tolist(), rank))
    assert sorted(by_position) == list(range(n))
    counts = [rank_batches(n, b, world, r, "keep") for r in range(world)]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_keep_with_shuffle_covers_the_shuffled_order_once() -> None:
    n, b, world = 23, 4, 3
    seen = []
    for rank in range(world):
        plan = EpochPlan(n, b, seed=8, epoch=1, rank=rank, world_size=world, tail="keep")
        seen += [i for k in range(len(plan)) for i in plan.batch(k).sample_ids.tolist()]
    assert sorted(seen) == list(range(n)) and seen != sorted(seen)
    # the shuffled order is the same whatever the tail
    pad = EpochPlan(n, b, seed=8, epoch=1, world_size=world, tail="pad")
    keep = EpochPlan(n, b, seed=8, epoch=1, world_size=world, tail="keep")
    np.testing.assert_array_equal(keep.batch(0).sample_ids, pad.batch(0).sample_ids)


def test_no_shuffle_with_balance_keeps_dataset_order() -> None:
    labels = np.array([0] * 6 + [1] * 2 + [2] * 3)
    plan = EpochPlan(11, 1, seed=4, epoch=0, tail="keep", labels=labels, balance=True,
                     shuffle=False)
    ids = np.concatenate([plan.batch(k).sample_ids for k in range(len(plan))])
    draws = np.concatenate([plan.batch(k).draw_ids for k in range(len(plan))])
    assert len(ids) == 18 and np.all(np.diff(ids) >= 0)  # repeats next to each other
    assert np.bincount(labels[ids]).tolist() == [6, 6, 6]
    assert len(set(draws.tolist())) == 18


@pytest.mark.parametrize("tail", ["drop_last", "pad", "keep"])
def test_rank_batches_matches_the_plans(tail: str) -> None:
    labels = np.array([0] * 7 + [1] * 2 + [3] * 4)
    counts = np.bincount(labels)
    for n, b, world, balance in [(13, 1, 1, False), (13, 2, 2, True), (13, 4, 3, False),
                                 (13, 5, 1, True), (13, 3, 5, False)]:
        for rank in range(world):
            try:
                plan = EpochPlan(n, b, 1, 2, rank, world, tail, labels=labels, balance=balance)
            except ValueError:
                with pytest.raises(ValueError, match="fewer than one round"):
                    rank_batches(n, b, world, rank, tail, counts if balance else None)
                continue
            assert rank_batches(n, b, world, rank, tail, counts if balance else None) == len(plan)
    with pytest.raises(ValueError, match="rank"):
        rank_batches(13, 2, 2, 2, tail)


# ---------------------------------------------------------------------------
# substitutes for corrupt samples


def test_substitutes_are_deterministic_distinct_draws() -> None:
    ids, draws = substitutes(seed=5, epoch=2, draw_id=17, num_samples=1000)
    assert len(ids) == len(draws) == SUBSTITUTE_ATTEMPTS
    again = substitutes(5, 2, 17, 1000)
    np.testing.assert_array_equal(ids, again[0])
    np.testing.assert_array_equal(draws, again[1])
    assert (0 <= ids).all() and (ids < 1000).all() and len(set(ids.tolist())) > 1
    assert (draws < 0).all()
    others = np.concatenate([substitutes(5, 2, d, 1000)[1] for d in range(40)])
    assert len(set(others.tolist())) == 40 * SUBSTITUTE_ATTEMPTS  # no two slots share a draw
    assert not np.array_equal(ids, substitutes(5, 3, 17, 1000)[0])
    with pytest.raises(ValueError, match="cannot be substituted"):
        substitutes(5, 2, -1, 1000)
