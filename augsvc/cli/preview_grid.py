"""A picture of what a spec does: originals beside several augmented draws, each labelled.

Each row is one image of the dataset; the first column is the original, captioned with
its file and class, then one column per draw (draw d is the sample in epoch d, so every
column is a different, reproducible augmentation), captioned with the parameters it
got: crop window, flips, hue shift, S and V power/scale/shift, PCA alpha. With
`reference=True` every draw is followed by the numpy oracle's rendering of the same
parameters and by their per-pixel difference, amplified, with its maximum.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from augsvc.core import reference
from augsvc.core.draws import BatchParams
from augsvc.core.spec import AugmentSpec
from augsvc.core.stats import DatasetStats
from augsvc.engine.augmenter import Augmenter
from augsvc.engine.dataset import DatasetIndex

__all__ = ["DIFF_GAIN", "diff_caption", "draw_caption", "render_grid", "row_caption"]

TITLE_HEIGHT = 14
LINE_HEIGHT = 11  # PIL's default bitmap font
CAPTION_LINES = 6
MIN_COLUMN_WIDTH = 162  # the longest caption line, ~27 characters of 6 px
GAP = 4
DIFF_GAIN = 8  # the difference panel shows |pipeline - numpy| x DIFF_GAIN


def row_caption(index: DatasetIndex, i: int) -> list[str]:
    """The original's caption: file (its last two path parts), class, decoded size."""
    path = Path(index.paths[i])
    label = int(index.labels[i])
    name = index.classes[label] if 0 <= label < len(index.classes) else "?"
    return [f"{path.parent.name}/{path.name}"[-27:], f"class {name} ({label})",
            f"{index.heights[i]}x{index.widths[i]} px"]


def draw_caption(params: BatchParams, k: int, spec: AugmentSpec) -> list[str]:
    """The parameters sample k of `params` got, one short line each."""
    y0, x0, y1, x1 = (float(v) for v in params.roi[k])
    flips = [name for name, on in (("h", params.flip_h[k]), ("v", params.flip_v[k])) if on]
    lines = [f"crop y{y0:g} x{x0:g} {y1 - y0:g}x{x1 - x0:g}",
             f"flip {'+'.join(flips)}" if flips else "no flip"]
    if spec.hsv:
        lines += [f"hue {params.hue_shift[k]:+.3f}",
                  f"S ^{params.sat_pow[k]:.2f} x{params.sat_scale[k]:.2f} "
                  f"{params.sat_shift[k]:+.3f}",
                  f"V ^{params.val_pow[k]:.2f} x{params.val_scale[k]:.2f} "
                  f"{params.val_shift[k]:+.3f}"]
    else:
        lines.append("HSV off")
    if spec.pca:
        lines.append("PCA a " + " ".join(f"{a:+.3f}" for a in params.pca_alpha[k]))
    else:
        lines.append("PCA off")
    return lines


def diff_caption(max_diff: float, spec: AugmentSpec) -> list[str]:
    """The difference panel's caption: what it shows and its maximum."""
    lines = [f"|pipeline - numpy| x{DIFF_GAIN}", f"max {max_diff:.2f} levels"]
    if spec.antialias:
        lines.append("(antialias on: the")
        lines.append("oracle has none)")
    return lines


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
    """The grid as a PIL image: num_images rows; 1 + draws (x3 with reference) columns."""
    if num_images < 1 or draws < 1:
        raise ValueError("num_images and draws must be >= 1")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(index), size=min(num_images, len(index)), replace=False))
    view = spec.replace(layout="NHWC", dtype="uint8", normalize=False)
    engine = Augmenter(index, view, stats, max_batch_size=len(picks), device=device)
    cell_h, cell_w = view.size
    blank = np.zeros((cell_h, cell_w, 3), np.uint8)
    titles = ["original"]
    columns: list[list[tuple[np.ndarray, list[str]]]] = [
        [(_fit(_decode(index.read(i)), view.size), row_caption(index, i)) for i in picks]]
    try:
        for d in range(draws):
            batch = engine.run(seed, d, picks, picks)
            by_id = dict(zip(batch.sample_ids.tolist(), batch.images, strict=True))
            params = engine.params(seed, d, picks, picks)
            outs = [by_id.get(int(i), blank) for i in picks]
            columns.append([(out, draw_caption(params, k, view)) for k, out in enumerate(outs)])
            titles.append(f"draw {d}")
            if reference_column:
                oracle = [_oracle(index.read(i), params, k, view) for k, i in enumerate(picks)]
                columns.append([(_to_uint8(o), ["numpy oracle, same draw"]) for o in oracle])
                titles.append(f"draw {d} (numpy)")
                columns.append([_diff(out, o, view) for out, o in zip(outs, oracle,
                                                                       strict=True)])
                titles.append(f"draw {d} difference")
    finally:
        engine.close()
    return _assemble(columns, titles, (cell_h, cell_w))


def _decode(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _oracle(data: bytes, params: BatchParams, k: int, spec: AugmentSpec) -> np.ndarray:
    """The numpy reference's rendering of sample k of `params` (float64 levels)."""
    return reference.apply(_decode(data), params, k, spec.size, colour=spec.colour)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _diff(out: np.ndarray, oracle: np.ndarray, spec: AugmentSpec) -> tuple[np.ndarray,
                                                                           list[str]]:
    """|pipeline - oracle| (largest channel) x DIFF_GAIN as grey, and its caption."""
    diff = np.abs(out.astype(np.float64) - oracle).max(axis=-1)
    grey = np.clip(diff * DIFF_GAIN, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), diff_caption(float(diff.max()), spec)


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


def _assemble(columns: list[list[tuple[np.ndarray, list[str]]]], titles: list[str],
              cell: tuple[int, int]) -> Image.Image:
    """Paste the cells, a title above each column and each cell's caption below it."""
    ch, cw = cell
    col_w = max(cw, MIN_COLUMN_WIDTH)
    row_h = ch + CAPTION_LINES * LINE_HEIGHT + GAP
    rows = len(columns[0])
    width = len(columns) * (col_w + GAP) + GAP
    height = TITLE_HEIGHT + rows * row_h + GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (col, title) in enumerate(zip(columns, titles, strict=True)):
        x = GAP + c * (col_w + GAP)
        draw.text((x, 1), title, fill=(0, 0, 0))
        for r, (img, caption) in enumerate(col):
            y = TITLE_HEIGHT + GAP + r * row_h
            canvas.paste(Image.fromarray(img), (x, y))
            for n, line in enumerate(caption[:CAPTION_LINES]):
                draw.text((x, y + ch + 1 + n * LINE_HEIGHT), line, fill=(40, 40, 40))
    return canvas
