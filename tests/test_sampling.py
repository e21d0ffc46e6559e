"""Sampling: epoch plans and per-sample parameters are pure functions of the seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from augsvc.core.sampling import COLOR_PARAMS, EpochPlan, draw_params, uniforms
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
    ({"tail": "keep"}, "drop_last, pad"),
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
