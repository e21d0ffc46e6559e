"""Synthetic data: the photo-like JPEG dataset and the coordinate-encoding PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augsvc.engine.synth import (
    coordinate_image,
    decode_coordinates,
    make_coordinate_png,
    make_dataset,
)


def test_jpeg_folder_layout(jpeg_folder: Path) -> None:
    files = sorted(jpeg_folder.glob("*/*.jpg"))
    assert [p.parent.name for p in files] == ["class_00"] * 4 + ["class_01"] * 4 + ["class_02"] * 4
    sizes = []
    for p in files:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
            im.load()
    widths, heights = np.array(sizes).T
    portrait = heights > widths
    assert portrait.sum() == 2
    assert len(set(sizes)) > 6  # sizes vary
    landscape_w = widths[~portrait]
    assert (landscape_w >= 450).all() and (landscape_w <= 550).all()
    assert all(20_000 < p.stat().st_size < 120_000 for p in files)  # photo-like compression


def test_photo_like_content(jpeg_folder: Path) -> None:
    """Per-class colour differs; images are neither flat nor white noise."""
    means = []
    for folder in sorted(p for p in jpeg_folder.iterdir() if p.is_dir()):
        pixels = [np.asarray(Image.open(p), np.float64) for p in sorted(folder.glob("*.jpg"))]
        means.append(np.mean([x.reshape(-1, 3).mean(0) for x in pixels], axis=0))
        for x in pixels:
            assert x.std() > 20  # real content
            neighbour = np.abs(np.diff(x, axis=1)).mean()
            assert neighbour < 0.5 * x.std()  # smooth, spatially correlated like a photo
    means = np.array(means)
    gaps = [np.abs(means[i] - means[j]).max() for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 5


def test_make_dataset_is_deterministic(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", num_classes=1, per_class=2, size=(40, 60), seed=3)
    b = make_dataset(tmp_path / "b", num_classes=1, per_class=2, size=(40, 60), seed=3)
    c = make_dataset(tmp_path / "c", num_classes=1, per_class=2, size=(40, 60), seed=4)
    name = "class_00/img_0001.jpg"
    assert (a / name).read_bytes() == (b / name).read_bytes() != (c / name).read_bytes()
    with pytest.raises(ValueError, match="num_classes"):
        make_dataset(tmp_path / "d", num_classes=0)


def test_coordinate_png_encoding(tmp_path: Path) -> None:
    path = make_coordinate_png(tmp_path / "sub" / "coords.png", 5, 256)
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (5, 256, 3) and np.array_equal(pixels, coordinate_image(5, 256))
    assert pixels[0, :, 0].tolist() == list(range(256))  # W - 1 = 255: R == x
    assert pixels[:, 0, 1].tolist() == [0, 64, 128, 191, 255]  # round(255 * y / 4)
    assert (pixels[..., 2] == 128).all()
    y, x = decode_coordinates(pixels, 5, 256)
    assert np.abs(x - np.arange(256)[None, :]).max() == 0
    assert np.abs(y - np.arange(5)[:, None]).max() <= 4 / 510
    assert coordinate_image(1, 1).tolist() == [[[0, 0, 128]]]


def test_coordinates_survive_crop_resize_and_flip(tmp_path: Path) -> None:
    """A bilinear crop+resize+flip decodes to the source positions of the output pixels."""
    h, w = 300, 400
    image = Image.open(make_coordinate_png(tmp_path / "c.png", h, w))
    box = (50.0, 30.0, 250.0, 230.0)  # x0, y0, x1, y1: a 200x200 window
    out_w, out_h = 128, 96
    out = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    y, x = decode_coordinates(out, h, w)
    # source position of output pixel (i, j) centre, then the flip mirrors j
    jj = np.arange(out_w)[::-1]
    ii = np.arange(out_h)
    want_x = box[0] + (jj + 0.5) * (box[2] - box[0]) / out_w - 0.5
    want_y = box[1] + (ii + 0.5) * (box[3] - box[1]) / out_h - 0.5
    # half an 8-bit level when written, half again when the resize rounds: (W - 1) / 255 px
    assert np.abs(x - want_x[None, :]).max() <= (w - 1) / 255
    assert np.abs(y - want_y[:, None]).max() <= (h - 1) / 255
    # no systematic shift: a half-pixel convention error would move the mean by 0.5
    assert abs((x - want_x[None, :]).mean()) < 0.15
    assert abs((y - want_y[:, None]).mean()) < 0.15
