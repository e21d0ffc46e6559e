"""A dataset's RGB statistics: computed from its pixels, stored beside it, loaded by source.

`compute_moments` streams every image (or a deterministic sample) through float64
accumulators, one set per image (`compute_stats` pools them); `stats_file` says where
`augsvc stats` keeps the result; `load_stats` returns the statistics a spec names.
The maths and the file format are `augsvc.core.stats`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from augsvc.core.stats import IMAGENET, DatasetStats, PixelMoments, StatsError, load
from augsvc.engine.dataset import DatasetIndex

__all__ = ["compute_moments", "compute_stats", "load_stats", "stats_file"]

log = logging.getLogger(__name__)

STATS_FILE_NAME = "augsvc-stats.json"
MANIFEST_STATS_SUFFIX = ".augsvc-stats.json"
ROWS_PER_CHUNK = 2048  # bounds the float64 copy of one image to ~2048 x width x 24 bytes


def compute_moments(
    index: DatasetIndex,
    max_images: int | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    seed: int = 0,
) -> PixelMoments:
    """Per-image RGB pixel moments of `index`'s images (`PixelMoments`).

    Decodes with Pillow (converted to RGB), accumulating in float64 on the 0..255 scale.
    With `max_images` < len(index) a deterministic random sample (from `seed`) is used.
    Images that fail to decode are skipped with a warning; StatsError if none decodes.
    `progress` wraps the loop over image indices (a progress bar, say); None: no wrapping.
    """
    from PIL import Image

    n = len(index)
    if max_images is not None and max_images < 1:
        raise StatsError(f"max_images must be >= 1, got {max_images}")
    if max_images is not None and max_images < n:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    else:
        chosen = np.arange(n)
    sums, products = np.zeros((len(chosen), 3)), np.zeros((len(chosen), 3, 3))
    pixels = np.zeros(len(chosen))
    decoded = np.zeros(len(chosen), dtype=bool)
    skipped: list[str] = []
    order: Iterable[int] = chosen.tolist()
    for row, i in enumerate(order if progress is None else progress(order)):
        try:
            with Image.open(io.BytesIO(index.read(i))) as im:  # the dataset's file rules
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            log.warning("skipping %s: cannot decode: %s", index.paths[i], exc)
            skipped.append(index.paths[i])
            continue
        for start in range(0, rgb.shape[0], ROWS_PER_CHUNK):
            x = rgb[start:start + ROWS_PER_CHUNK].reshape(-1, 3).astype(np.float64)
            sums[row] += x.sum(axis=0)
            products[row] += x.T @ x
        pixels[row] = rgb.shape[0] * rgb.shape[1]
        decoded[row] = True
    if pixels.sum() == 0:
        raise StatsError(f"no image of {index.source} could be decoded "
                         f"({len(skipped)} tried)")
    if skipped:
        log.warning("%d image(s) skipped because they could not be decoded", len(skipped))
    return PixelMoments(sums[decoded], products[decoded], pixels[decoded])


def compute_stats(
    index: DatasetIndex,
    max_images: int | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    seed: int = 0,
) -> DatasetStats:
    """Mean, covariance and eigenbasis of the RGB pixels of `index`'s images (or of a
    deterministic sample of `max_images`); see `compute_moments`."""
    return compute_moments(index, max_images, progress, seed).stats(str(index.source))


def stats_file(index: DatasetIndex) -> Path:
    """Where a dataset's stats live: `<root>/augsvc-stats.json`, `<manifest>.augsvc-stats.json`."""
    if index.manifest is not None:
        return index.manifest.with_name(index.manifest.name + MANIFEST_STATS_SUFFIX)
    return index.root / STATS_FILE_NAME


def load_stats(index: DatasetIndex, source: str) -> DatasetStats:
    """The stats a spec names: "imagenet" (the preset), "dataset" (the saved file) or
    "auto" (the saved file when there is one, else the preset)."""
    if source == "auto":
        source = "dataset" if stats_file(index).is_file() else "imagenet"
    if source == "imagenet":
        return IMAGENET
    if source == "dataset":
        path = stats_file(index)
        if not path.is_file():
            raise StatsError(f"no statistics for dataset {index.source} (expected {path}); "
                             f"run `augsvc stats {index.source}`")
        return load(path)
    raise StatsError(f"unknown stats source {source!r}; expected 'auto', 'dataset' or "
                     f"'imagenet'")
