"""Photo-like bench images: real photographs cropped, resized and re-encoded like ImageNet's.

Synthetic gradients decode faster than photographs and flatter every throughput figure,
so `augsvc bench` measures on crops of real photos: the six public-domain / CC0 sample
photographs that scikit-image ships (`_photos/`, licences in `_photos/LICENSE.md`).
Each image is a random crop (half the photo's area or more, aspect ratio in [3/4, 4/3]),
resized with Lanczos so its longer side is 400-500 px (ImageNet's typical 500x375 /
500x333) and saved as a baseline 4:2:0 JPEG of quality 85-95. Same arguments, same
choices; the bytes are those of this machine's Pillow/libjpeg.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["SOURCES", "make_photo_set", "repeat_manifest"]

SOURCES = Path(__file__).with_name("_photos")
LONG_SIDE = (400, 500)
QUALITY = (85, 95)
MIN_AREA = 0.5


def _sources() -> list[Path]:
    photos = sorted(SOURCES.glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no source photographs in {SOURCES}: the augsvc install is "
                                "incomplete (package data missing)")
    return photos


def make_photo_set(root: str | Path, num_images: int = 256, num_classes: int = 8,
                   seed: int = 0) -> Path:
    """Write `num_images` JPEGs as `root/class_XX/img_XXXX.jpg` (image i in class i mod
    `num_classes`, cut from source photo i mod 6); return root."""
    from PIL import Image

    if num_images < 1 or num_classes < 1:
        raise ValueError(f"need num_images, num_classes >= 1, got {num_images}, {num_classes}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = []
    for path in _sources():
        with Image.open(path) as im:
            photos.append(im.convert("RGB"))
    for i in range(num_images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        area = w * h * rng.uniform(MIN_AREA, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = min(w, round(math.sqrt(area * aspect)))
        ch = min(h, round(math.sqrt(area / aspect)))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
        scale = long_side / max(cw, ch)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / f"class_{i % num_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
        crop.save(folder / f"img_{i:04d}.jpg", quality=quality, subsampling="4:2:0")
    for photo in photos:
        photo.close()
    return root


def repeat_manifest(root: str | Path, epoch_images: int) -> Path:
    """`root/epoch.csv`: the set's JPEGs listed over and over, up to `epoch_images` rows.

    A training epoch is thousands of batches, not the few that a few hundred images make;
    the repeats are distinct samples to the sampler, the same files to the page cache.
    """
    root = Path(root)
    files = sorted(root.glob("*/*.jpg"))
    if not files:
        raise FileNotFoundError(f"no JPEGs in {root}/<class>/")
    repeats = max(1, -(-epoch_images // len(files)))
    rows = [f"{f},{int(f.parent.name.split('_')[-1])}\n" for f in files] * repeats
    manifest = root / "epoch.csv"
    manifest.write_text("path,label\n" + "".join(rows))
    return manifest
