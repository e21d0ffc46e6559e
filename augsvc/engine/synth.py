"""Synthetic test data: photo-like JPEG datasets and coordinate-encoding PNGs.

`make_dataset` writes an image-folder dataset (`root/<class>/<file>.jpg`) whose
images look statistically like photos: a smooth two-colour gradient, soft blobs,
a few hard-edged shapes, low-frequency shading and fine grain, in a colour scheme
that differs per class. Sizes vary around the requested size; every fifth image
is portrait. Same arguments, same bytes.

`make_coordinate_png` writes an image whose pixels encode their own position:

    R = round(255 * x / (W - 1)),  G = round(255 * y / (H - 1)),  B = 128

(x, y are the pixel's column and row; a side of length 1 encodes 0). Both channels
are linear in the coordinates, and linear interpolation (any resize filter whose
weights sum to 1 and are symmetric, away from the borders) maps a linear function
to the same linear function, so after any crop + resize + flip `decode_coordinates`
recovers which source position each output pixel came from, to within the 8-bit
quantisation: +/- (W - 1) / 510 source pixels in x, (H - 1) / 510 in y for the
image as written, twice that (one level) after a resize that rounds to uint8 again.
Keep the sides <= 256 for exact integer positions in the unresized image.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["coordinate_image", "decode_coordinates", "make_coordinate_png", "make_dataset"]

COORD_BLUE = 128


def make_dataset(
    root: str | Path,
    num_classes: int = 4,
    per_class: int = 8,
    size: tuple[int, int] = (375, 500),
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write `num_classes` x `per_class` photo-like JPEGs under `root/<class>/`; return root.

    `size` is the typical (height, width); each image varies by up to ~10 %, and every
    fifth one (global order) is portrait (height and width swapped). Classes are named
    `class_00`, `class_01`, ...
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"need num_classes, per_class >= 1, got {num_classes}, {per_class}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        hue = (c / num_classes + 0.07 * rng.random()) % 1.0
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            h, w = (round(s * rng.uniform(0.9, 1.1)) for s in size)
            if (c * per_class + k) % 5 == 4:
                h, w = w, h
            image = _photo(rng, max(h, 8), max(w, 8), hue)
            image.save(folder / f"img_{k:04d}.jpg", quality=quality)
    return root


def _photo(rng: np.random.Generator, h: int, w: int, hue: float) -> Image.Image:
    """One photo-like RGB image with colours around `hue`."""
    # smooth content on a 1/4-scale canvas, upsampled once: gradient, blobs, shading
    sh, sw = max(h // 4, 2), max(w // 4, 2)
    yy = np.linspace(0.0, 1.0, sh, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, sw, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0 = _colour(rng, hue, value=(0.15, 0.5))  # dark to light
    c1 = _colour(rng, hue + rng.uniform(-0.15, 0.15), value=(0.6, 0.95))
    img = c0 + t[..., None] * (c1 - c0)
    for _ in range(rng.integers(3, 7)):  # soft blobs
        cy, cx = rng.uniform(0, 1, 2)
        sy, sx = rng.uniform(0.05, 0.3, 2)
        weight = np.exp(-0.5 * ((yy - cy) / sy) ** 2) * np.exp(-0.5 * ((xx - cx) / sx) ** 2)
        img += (0.8 * weight)[..., None] * (_colour(rng, hue + rng.uniform(-0.3, 0.3)) - img)
    # shading (light and shadow) is mostly luminance, as in photos
    coarse = rng.normal(0.0, 1.0, (max(h // 48, 2), max(w // 48, 2), 1)) * [30.0, 30.0, 30.0]
    coarse += rng.normal(0.0, 8.0, coarse.shape)
    shade = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
    img += np.asarray(shade.resize((sw, sh), Image.Resampling.BICUBIC), np.float32) - 128
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    image = small.resize((w, h), Image.Resampling.BICUBIC)
    # a few hard-edged shapes at full resolution
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        fill = tuple(int(v) for v in _colour(rng, hue + rng.uniform(-0.5, 0.5)))
        box = (x0, y0, max(x1, x0 + 4), max(y1, y0 + 4))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    # fine grain: luminance plus a little chroma noise, roughly +/- 8 levels
    luma = rng.integers(0, 13, (h, w, 1), dtype=np.int16)
    chroma = rng.integers(0, 5, (h, w, 3), dtype=np.int16)
    out = np.asarray(image, np.int16) + luma + chroma - 8
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _colour(
    rng: np.random.Generator, hue: float, value: tuple[float, float] = (0.2, 0.95)
) -> np.ndarray:
    """An RGB colour (0..255, float32) of the given hue, random saturation and value."""
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.2, 0.7), rng.uniform(*value))
    return np.array(rgb, np.float32) * 255


def coordinate_image(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 with R encoding x, G encoding y, B = 128 (module docstring)."""
    if height < 1 or width < 1:
        raise ValueError(f"need height, width >= 1, got {height}, {width}")
    x = np.arange(width) * (255.0 / max(width - 1, 1))
    y = np.arange(height) * (255.0 / max(height - 1, 1))
    out = np.empty((height, width, 3), np.uint8)
    out[..., 0] = np.rint(x)[None, :]
    out[..., 1] = np.rint(y)[:, None]
    out[..., 2] = COORD_BLUE
    return out


def make_coordinate_png(path: str | Path, height: int, width: int) -> Path:
    """Write `coordinate_image(height, width)` as a lossless PNG; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coordinate_image(height, width)).save(path)
    return path


def decode_coordinates(
    pixels: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source (y, x) positions, float64, of (..., 3) RGB pixels of a coordinate image."""
    rgb = np.asarray(pixels, dtype=np.float64)
    x = rgb[..., 0] * (max(width - 1, 0) / 255.0)
    y = rgb[..., 1] * (max(height - 1, 0) / 255.0)
    return y, x
