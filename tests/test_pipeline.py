"""The DALI pipeline against the numpy oracle: crop window, flip, colour, output format.

Crop and flip are checked on lossless PNGs whose pixels encode their own coordinates
(R = x, G = y): bilinear interpolation of a linear ramp is exact, so every output
pixel must equal the oracle's value within DALI's final rounding (0.5 level), and a
window off by one source pixel would show. Colour is checked by running the same
parameters with the colour kernel on and off.
"""

from __future__ import annotations

import numpy as np
import pytest
from support import coordinate_image, encode, requires_gpu

from augsvc.core import reference as ref
from augsvc.core.draws import BatchParams, draw_params
from augsvc.core.spec import AugmentSpec
from augsvc.engine.pipeline import AugmentPipeline

BASIS = (np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]]), np.array([0.2175, 0.0188, 0.0045]))
SIZES = [(200, 256), (256, 180), (97, 131), (256, 256), (150, 90)]


def batch_params(spec: AugmentSpec, shapes: list[tuple[int, int]], seed: int = 3) -> BatchParams:
    hw = np.array(shapes)
    return draw_params(spec, seed, 0, np.arange(len(shapes)), hw[:, 0], hw[:, 1], BASIS)


def check_geometry(device: str, spec: AugmentSpec, seed: int) -> None:
    images = [coordinate_image(h, w) for h, w in SIZES * 3]
    shapes = [im.shape[:2] for im in images]
    params = batch_params(spec, shapes, seed)
    pipe = AugmentPipeline(spec, max_batch_size=len(images), device=device)
    out = pipe.run([encode(im) for im in images], params)
    assert out.shape == (len(images), *spec.size, 3) and out.dtype == np.uint8
    for i, im in enumerate(images):
        expect = ref.flip(ref.crop_resize(im, params.roi[i], spec.size),
                          bool(params.flip_h[i]), bool(params.flip_v[i]))
        diff = np.abs(out[i].astype(np.float64) - expect)
        assert diff.max() <= 0.5 + 1e-3, (i, params.roi[i], diff.max())


@pytest.mark.parametrize("crop", ["random_resized_crop", "random_crop", "center_crop"])
@pytest.mark.parametrize("seed", [0, 1])
def test_crop_window_and_flip_are_exact_cpu(crop: str, seed: int) -> None:
    spec = AugmentSpec(crop=crop, size=(48, 40), resize=64, hsv=False, pca=False,
                       antialias=False, p_hflip=0.5, p_vflip=0.5)
    check_geometry("cpu", spec, seed)


def test_flip_probabilities_one_and_zero() -> None:
    img = coordinate_image(64, 64)
    spec = AugmentSpec(crop="center_crop", size=(64, 64), resize=64, hsv=False, pca=False,
                       p_hflip=1.0, p_vflip=1.0)
    params = batch_params(spec, [(64, 64)])
    out = AugmentPipeline(spec, max_batch_size=1).run([encode(img)], params)[0]
    np.testing.assert_array_equal(out, img[::-1, ::-1])
    plain = spec.replace(p_hflip=0.0, p_vflip=0.0)
    out = AugmentPipeline(plain, max_batch_size=1).run([encode(img)], batch_params(plain,
                                                                                [(64, 64)]))
    np.testing.assert_array_equal(out[0], img)


def check_colour(device: str) -> None:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES * 4]
    images.append(np.full((64, 64, 3), 128, np.uint8))  # grey: S = 0
    images.append(np.zeros((64, 64, 3), np.uint8))  # black: V = 0
    encoded = [encode(im) for im in images]
    shapes = [im.shape[:2] for im in images]
    spec = AugmentSpec(size=(64, 64))
    params = batch_params(spec, shapes, seed=9)
    plain_spec = spec.replace(hsv=False, pca=False)
    plain = AugmentPipeline(plain_spec, max_batch_size=len(images), device=device)
    coloured = AugmentPipeline(spec, max_batch_size=len(images), device=device)
    base = plain.run(encoded, batch_params(plain_spec, shapes, seed=9))
    out = coloured.run(encoded, params)
    colour = params.color_matrix()
    for i in range(len(images)):
        expect = ref.color(base[i], colour[i])
        diff = np.abs(out[i].astype(np.float64) - expect)
        assert diff.max() <= 1.0, (i, colour[i], diff.max())


def test_colour_matches_reference_cpu() -> None:
    check_colour("cpu")


@pytest.mark.parametrize(("layout", "dtype"), [("NCHW", "float32"), ("NHWC", "float16")])
def test_normalize_layout_dtype(layout: str, dtype: str) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    encoded = [encode(im) for im in images]
    base_spec = AugmentSpec(size=(32, 48))
    spec = base_spec.replace(normalize=True, layout=layout, dtype=dtype)
    params = batch_params(spec, [(120, 160)] * 3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    base = AugmentPipeline(base_spec, max_batch_size=3).run(encoded, params)
    out = AugmentPipeline(spec, max_batch_size=3, mean=mean, std=std).run(encoded, params)
    expect = np.stack([ref.normalize(b, mean, std) for b in base])
    if layout == "NCHW":
        expect = expect.transpose(0, 3, 1, 2)
    assert out.dtype == np.dtype(dtype) and out.shape == expect.shape
    assert out.flags.c_contiguous
    np.testing.assert_allclose(out.astype(np.float64), expect, atol=2e-3 if dtype == "float16"
                               else 1e-5)


def test_uint8_nchw() -> None:
    img = coordinate_image(64, 64)
    spec = AugmentSpec(crop="center_crop", size=(64, 64), resize=64, hsv=False, pca=False,
                       p_hflip=0.0, layout="NCHW")
    out = AugmentPipeline(spec, max_batch_size=1).run([encode(img)],
                                                      batch_params(spec, [(64, 64)]))
    np.testing.assert_array_equal(out[0], img.transpose(2, 0, 1))


def test_run_rejects_mismatched_inputs() -> None:
    spec = AugmentSpec(hsv=False, pca=False)
    pipe = AugmentPipeline(spec, max_batch_size=2)
    params = batch_params(spec, [(64, 64)] * 3)
    img = encode(coordinate_image(64, 64))
    with pytest.raises(ValueError, match="3 parameter sets"):
        pipe.run([img, img], params)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        pipe.run([img] * 3, params)
    with pytest.raises(ValueError, match="device"):
        AugmentPipeline(spec, max_batch_size=2, device="tpu")


@requires_gpu
@pytest.mark.parametrize("crop", ["random_resized_crop", "center_crop"])
def test_crop_window_and_flip_are_exact_gpu(crop: str) -> None:
    spec = AugmentSpec(crop=crop, size=(48, 40), resize=64, hsv=False, pca=False,
                       antialias=False, p_hflip=0.5, p_vflip=0.5)
    check_geometry("gpu", spec, 0)


@requires_gpu
def test_colour_matches_reference_gpu() -> None:
    check_colour("gpu")
