"""`augsvc preview`'s captions: what each row and each draw says about itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from augsvc.cli.preview_grid import DIFF_GAIN, diff_caption, draw_caption, row_caption
from augsvc.core.draws import BatchParams
from augsvc.core.spec import AugmentSpec
from augsvc.engine.dataset import open_dataset


def _params() -> BatchParams:
    def one(*v: float) -> np.ndarray:  # one sample: (1,) for a scalar, (1, n) for a vector
        return np.array([v if len(v) > 1 else v[0]], dtype=np.float32)

    return BatchParams(
        roi=one(12, 40.5, 312, 300.5), window=np.array([[12, 40, 312, 301]], np.int32),
        flip_h=np.array([True]), flip_v=np.array([True]), hue_shift=one(-0.0421),
        sat_pow=one(1.234), sat_scale=one(0.9), sat_shift=one(0.05), val_pow=one(0.5),
        val_scale=one(1.1), val_shift=one(-0.012), pca_alpha=one(0.1, -0.05, 0.0),
        rgb_offset=one(1.0, 2.0, 3.0))


def test_draw_caption_lists_every_parameter() -> None:
    lines = draw_caption(_params(), 0, AugmentSpec())
    assert lines == ["crop y12 x40.5 300x260", "flip h+v", "hue -0.042",
                     "S ^1.23 x0.90 +0.050", "V ^0.50 x1.10 -0.012",
                     "PCA a +0.100 -0.050 +0.000"]
    off = draw_caption(_params(), 0, AugmentSpec(hsv=False, pca=False))
    assert off[2:] == ["HSV off", "PCA off"]


def test_row_and_difference_captions(jpeg_folder: Path) -> None:
    index = open_dataset(jpeg_folder)
    path = Path(index.paths[0])
    label = int(index.labels[0])
    assert row_caption(index, 0) == [f"{path.parent.name}/{path.name}",
                                     f"class {index.classes[label]} ({label})",
                                     f"{index.heights[0]}x{index.widths[0]} px"]
    assert diff_caption(3.256, AugmentSpec(antialias=False)) == [
        f"|pipeline - numpy| x{DIFF_GAIN}", "max 3.26 levels"]
    assert "oracle has none)" in diff_caption(0.5, AugmentSpec(antialias=True))
