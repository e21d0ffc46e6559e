"""The float64 numpy oracle: every augmentation applied from given parameters.

Nothing here draws random values; `augsvc.core.draws` does. Tests compare the DALI
pipeline and the colour kernel against these functions, and `augsvc preview
--reference` renders with them. Definitions follow DESIGN.md (normative).
"""

from __future__ import annotations

import numpy as np

from augsvc.core.draws import COLOR_PARAMS, BatchParams

__all__ = [
    "apply",
    "color",
    "crop_resize",
    "flip",
    "hsv_to_rgb",
    "normalize",
    "rgb_to_hsv",
]


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Exact hexcone RGB->HSV on (..., 3) values in [0, 1]; H in [0, 1)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)
    s = np.divide(c, v, out=np.zeros_like(v), where=v > 0)
    safe_c = np.where(c > 0, c, 1.0)
    h = np.where(
        v == r,
        np.mod((g - b) / safe_c, 6.0),
        np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0),
    )
    h = np.where(c > 0, h / 6.0, 0.0)
    return np.stack([np.mod(h, 1.0), s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Exact hexcone HSV->RGB on (..., 3) values, H taken mod 1."""
    hsv = np.asarray(hsv, dtype=np.float64)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = np.mod(h, 1.0) * 6.0
    sector = np.floor(h6)
    f = h6 - sector
    sector = sector.astype(np.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    choices_r = [v, q, p, p, t, v]
    choices_g = [t, v, v, q, p, p]
    choices_b = [p, p, t, v, v, q]
    out = np.stack(
        [
            np.choose(sector, choices_r),
            np.choose(sector, choices_g),
            np.choose(sector, choices_b),
        ],
        axis=-1,
    )
    return out


def color(image: np.ndarray, params: np.ndarray) -> np.ndarray:
    """HSV power/scale/shift + hue shift + fancy-PCA offset on one uint8 HWC image.

    `params` is one row of `BatchParams.color_matrix()` (order `COLOR_PARAMS`).
    Returns float64 in uint8 levels, clipped to [0, 255] but not rounded.
    """
    p = dict(zip(COLOR_PARAMS, np.asarray(params, dtype=np.float64), strict=True))
    hsv = rgb_to_hsv(np.asarray(image, dtype=np.float64) / 255.0)
    h = np.mod(hsv[..., 0] + p["hue_shift"], 1.0)
    s = np.clip(hsv[..., 1] ** p["sat_pow"] * p["sat_scale"] + p["sat_shift"], 0.0, 1.0)
    v = np.clip(hsv[..., 2] ** p["val_pow"] * p["val_scale"] + p["val_shift"], 0.0, 1.0)
    rgb = hsv_to_rgb(np.stack([h, s, v], axis=-1)) * 255.0
    offset = np.array([p["offset_r"], p["offset_g"], p["offset_b"]])
    return np.clip(rgb + offset, 0.0, 255.0)


def crop_resize(
    image: np.ndarray, roi: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Bilinear resize of the window `roi` = (y0, x0, y1, x1) (source pixels) to `size` (h, w).

    Pixel centres are aligned (sample at y0 + (i + 0.5) * (y1 - y0) / h - 0.5), edges
    clamped; no antialiasing, so this equals DALI's `linear` resize wherever the
    window is not downscaled by more than 2x.
    """
    img = np.asarray(image, dtype=np.float64)
    y0, x0, y1, x1 = (float(v) for v in roi)
    out_h, out_w = size
    ys = y0 + (np.arange(out_h) + 0.5) * (y1 - y0) / out_h - 0.5
    xs = x0 + (np.arange(out_w) + 0.5) * (x1 - x0) / out_w - 0.5
    ys = np.clip(ys, 0, img.shape[0] - 1)
    xs = np.clip(xs, 0, img.shape[1] - 1)
    yi = np.minimum(np.floor(ys).astype(np.int64), img.shape[0] - 2).clip(0)
    xi = np.minimum(np.floor(xs).astype(np.int64), img.shape[1] - 2).clip(0)
    fy = (ys - yi)[:, None, None] if img.shape[0] > 1 else np.zeros((out_h, 1, 1))
    fx = (xs - xi)[None, :, None] if img.shape[1] > 1 else np.zeros((1, out_w, 1))
    yj = np.minimum(yi + 1, img.shape[0] - 1)
    xj = np.minimum(xi + 1, img.shape[1] - 1)
    top = img[yi][:, xi] * (1 - fx) + img[yi][:, xj] * fx
    bottom = img[yj][:, xi] * (1 - fx) + img[yj][:, xj] * fx
    return top * (1 - fy) + bottom * fy


def flip(image: np.ndarray, horizontal: bool, vertical: bool) -> np.ndarray:
    """Mirror an HWC image left-right and/or top-bottom."""
    out = image
    if horizontal:
        out = out[:, ::-1]
    if vertical:
        out = out[::-1]
    return out


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-channel (x/255 - mean) / std, with mean and std given on the [0, 1] scale."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    return (x - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)


def apply(
    image: np.ndarray,
    params: BatchParams,
    i: int,
    size: tuple[int, int],
    *,
    colour: bool = True,
) -> np.ndarray:
    """The whole chain for sample `i` of `params`: crop -> flip -> colour; float64 HWC in [0, 255].

    Normalisation, layout and dtype are output formatting and are left to the caller.
    """
    out = crop_resize(image, params.roi[i], size)
    out = flip(out, bool(params.flip_h[i]), bool(params.flip_v[i]))
    if colour:
        out = color(np.clip(np.rint(out), 0, 255).astype(np.uint8), params.color_matrix()[i])
    return out
