"""A picture of what a spec does: originals beside several augmented draws.

Each row is one image of the dataset; the first column is the original, then one
column per draw (draw d is the sample in epoch d, so every column is a different,
reproducible augmentation). With `reference=True` every draw is shown twice: the
pipeline's output and the numpy oracle's rendering of the same parameters.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw

from augsvc.core import reference
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import DatasetIndex

__all__ = ["render_grid"]

LABEL_HEIGHT = 14


def render_grid(
    index: DatasetIndex,
    spec: AugmentSpec,
    stats: DatasetStats,
    *,
    num_images: int = 4,
    draws: int = 4,
    seed: int = 0,
    reference_column: bool = False,
    device: str = "cpu",
) -> Image.Image:
    """The grid as a PIL image (num_images rows, 1 + draws (x2 with reference) columns)."""
    if num_images < 1 or draws < 1:
        raise ValueError("num_images and draws must be >= 1")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(index), size=min(num_images, len(index)), replace=False))
    view = spec.replace(layout="NHWC", dtype="uint8", normalize=False)
    engine = Augmenter(index, view, stats, max_batch_size=len(picks), device=device)
    cell_h, cell_w = view.size
    titles = ["original"]
    columns: list[list[np.ndarray]] = [[_fit(_decode(index.read(i)), view.size) for i in picks]]
    try:
        for d in range(draws):
            batch = engine.run(seed, d, picks, picks)
            by_id = dict(zip(batch.sample_ids.tolist(), batch.images, strict=True))
            blank = np.zeros((cell_h, cell_w, 3), np.uint8)
            columns.append([by_id.get(int(i), blank) for i in picks])
            titles.append(f"draw {d}")
            if reference_column:
                params = engine.params(seed, d, picks, picks)
                columns.append([
                    _oracle(index.read(i), params, k, view) for k, i in enumerate(picks)
                ])
                titles.append(f"draw {d} (numpy)")
    finally:
        engine.close()
    return _assemble(columns, titles, (cell_h, cell_w))


def _decode(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _oracle(data: bytes, params, k: int, spec: AugmentSpec) -> np.ndarray:
    """The numpy reference's rendering of sample k of `params`."""
    out = reference.apply(_decode(data), params, k, spec.size, colour=spec.colour)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Letterbox an image into a cell of `size`."""
    h, w = size
    scale = min(h / img.shape[0], w / img.shape[1])
    new = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    small = np.asarray(Image.fromarray(img).resize(new, Image.BILINEAR))
    cell = np.full((h, w, 3), 32, np.uint8)
    y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    cell[y : y + small.shape[0], x : x + small.shape[1]] = small
    return cell


def _assemble(columns: list[list[np.ndarray]], titles: list[str],
              cell: tuple[int, int]) -> Image.Image:
    """Paste the cells with a 4-pixel gap and a title above each column."""
    gap = 4
    ch, cw = cell
    rows = len(columns[0])
    width = len(columns) * (cw + gap) + gap
    height = LABEL_HEIGHT + rows * (ch + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (col, title) in enumerate(zip(columns, titles, strict=True)):
        x = gap + c * (cw + gap)
        draw.text((x, 1), title, fill=(0, 0, 0))
        for r, img in enumerate(col):
            canvas.paste(Image.fromarray(img), (x, LABEL_HEIGHT + gap + r * (ch + gap)))
    return canvas
