"""The numpy oracle against independent implementations (colorsys, OpenCV)."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pytest

from augsvc.core import reference as ref
from augsvc.core.draws import COLOR_PARAMS

RNG = np.random.default_rng(11)
EDGE_RGB = np.array([
    [0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5],  # black, white, grey
    [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],  # primaries/secondaries
    [1, 0, 1e-3], [1, 1e-3, 0],  # hue just below 1 and just above 0
    [1 / 255, 0, 0], [254 / 255, 1, 1],
])


def _pixels() -> np.ndarray:
    return np.concatenate([RNG.random((5000, 3)), EDGE_RGB,
                           RNG.integers(0, 256, (5000, 3)) / 255.0])


def test_rgb_to_hsv_matches_colorsys() -> None:
    px = _pixels()
    expect = np.array([colorsys.rgb_to_hsv(*p) for p in px])
    np.testing.assert_allclose(ref.rgb_to_hsv(px), expect, atol=1e-12)


def test_hsv_to_rgb_matches_colorsys() -> None:
    hsv = np.concatenate([RNG.random((5000, 3)), [[0.999999, 1, 1], [0, 0, 0.3], [1 / 6, 1, 1]]])
    expect = np.array([colorsys.hsv_to_rgb(*p) for p in hsv])
    np.testing.assert_allclose(ref.hsv_to_rgb(hsv), expect, atol=1e-12)


def test_rgb_to_hsv_matches_opencv() -> None:
    px = _pixels().astype(np.float32)
    cv = cv2.cvtColor(px[None], cv2.COLOR_RGB2HSV)[0].astype(np.float64)
    ours = ref.rgb_to_hsv(px)
    # OpenCV divides by (V + FLT_EPSILON): S differs by up to ~3e-5 for the darkest pixels
    np.testing.assert_allclose(ours[:, 1:], cv[:, 1:], atol=1e-4)
    dh = np.abs(ours[:, 0] * 360 - cv[:, 0])
    assert np.minimum(dh, 360 - dh).max() < 1e-2  # OpenCV works in float32 degrees


def test_color_identity_parameters_change_nothing() -> None:
    img = RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    ident = np.array([0, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=np.float64)
    np.testing.assert_allclose(ref.color(img, ident), img, atol=1e-9)


def test_color_applies_each_term() -> None:
    img = np.array([[[200, 100, 50]]], dtype=np.uint8)
    h, s, v = colorsys.rgb_to_hsv(200 / 255, 100 / 255, 50 / 255)
    p = dict(zip(COLOR_PARAMS, [0.05, 2.0, 1.2, -0.05, 0.5, 0.9, 0.02, 3.0, -4.0, 1.5],
                 strict=True))
    s2 = min(max(s ** 2.0 * 1.2 - 0.05, 0), 1)
    v2 = min(max(v ** 0.5 * 0.9 + 0.02, 0), 1)
    rgb = np.array(colorsys.hsv_to_rgb((h + 0.05) % 1, s2, v2)) * 255 + [3.0, -4.0, 1.5]
    np.testing.assert_allclose(ref.color(img, np.array(list(p.values())))[0, 0], rgb, atol=1e-9)


def test_hue_wraps_in_both_directions() -> None:
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    params = np.array([-0.1, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=np.float64)
    out = ref.color(red, params)[0, 0]
    expect = np.array(colorsys.hsv_to_rgb(0.9, 1, 1)) * 255
    np.testing.assert_allclose(out, expect, atol=1e-9)


def test_crop_resize_of_a_linear_ramp_is_exact() -> None:
    h, w = 40, 60
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx, yy, np.zeros_like(xx)], axis=-1)
    out = ref.crop_resize(img, np.array([4, 6, 24, 36]), (10, 15))
    # output pixel (i, j) samples source (4 + (i + .5) * 2 - .5, 6 + (j + .5) * 2 - .5)
    np.testing.assert_allclose(out[..., 0], np.tile(6 + np.arange(15) * 2 + 0.5, (10, 1)))
    np.testing.assert_allclose(out[..., 1], np.tile((4 + np.arange(10) * 2 + 0.5)[:, None],
                                                    (1, 15)))


@pytest.mark.parametrize(("hf", "vf"), [(False, False), (True, False), (False, True), (True, True)])
def test_flip(hf: bool, vf: bool) -> None:
    img = np.arange(24).reshape(2, 4, 3)
    out = ref.flip(img, hf, vf)
    expect = img[:, ::-1] if hf else img
    expect = expect[::-1] if vf else expect
    np.testing.assert_array_equal(out, expect)


def test_normalize() -> None:
    img = np.full((2, 2, 3), 255, dtype=np.uint8)
    out = ref.normalize(img, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    np.testing.assert_allclose(out[0, 0], [2.0, 1.0, 0.5])
