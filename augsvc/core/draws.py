"""Per-sample augmentation parameters, as pure functions of (seed, epoch, draw id).

`draw_params` draws every parameter of a whole batch, one numpy array per parameter,
from a counter-based hash (`uniforms`) keyed by (seed, epoch, draw id, stream).
Parameters depend on nothing else: not on batch size, world size, position in the
batch, server or stream. Which samples, and their draw ids, is `augsvc.core.sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from augsvc.core.spec import AugmentSpec

__all__ = ["COLOR_PARAMS", "BatchParams", "draw_params", "uniforms"]

COLOR_PARAMS = (
    "hue_shift", "sat_pow", "sat_scale", "sat_shift", "val_pow", "val_scale", "val_shift",
    "offset_r", "offset_g", "offset_b",
)
RRC_ATTEMPTS = 10

# independent random streams, one per kind of parameter (5: `augsvc.core.sampling.substitutes`)
_CROP, _FLIP, _HSV, _PCA = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, draw_ids: np.ndarray, stream: int, n: int) -> np.ndarray:
    """(len(draw_ids), n) float64 uniforms in [0, 1), a pure function of every argument."""
    ids = np.asarray(draw_ids, dtype=np.int64).astype(np.uint64)
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & _MASK64))
    per_sample = _splitmix64(key ^ ids)[:, None]
    counters = (np.uint64(stream) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    bits = _splitmix64(per_sample ^ _splitmix64(counters)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class BatchParams:
    """Per-sample parameters of one batch; every field has the batch as its first axis."""

    roi: np.ndarray  # (B, 4) float32: y0, x0, y1, x1 in source pixels
    flip_h: np.ndarray  # (B,) bool
    flip_v: np.ndarray  # (B,) bool
    hue_shift: np.ndarray  # (B,) float32, the rest of the colour vector likewise
    sat_pow: np.ndarray
    sat_scale: np.ndarray
    sat_shift: np.ndarray
    val_pow: np.ndarray
    val_scale: np.ndarray
    val_shift: np.ndarray
    pca_alpha: np.ndarray  # (B, 3) float32, alpha ~ N(0, sigma^2)
    rgb_offset: np.ndarray  # (B, 3) float32, the fancy-PCA offset in uint8 levels

    def __len__(self) -> int:
        return len(self.flip_h)

    def color_matrix(self) -> np.ndarray:
        """(B, 10) float32 in `COLOR_PARAMS` order: what the colour kernel takes."""
        cols = [getattr(self, name) for name in COLOR_PARAMS[:7]]
        return np.ascontiguousarray(
            np.column_stack([*cols, self.rgb_offset]), dtype=np.float32
        )

    def as_dict(self) -> dict[str, list]:
        """Plain lists, for printing and replaying a batch."""
        return {k: v.tolist() for k, v in self.__dict__.items()}


def draw_params(
    spec: AugmentSpec,
    seed: int,
    epoch: int,
    draw_ids: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    pca_basis: tuple[np.ndarray, np.ndarray] | None = None,
) -> BatchParams:
    """Every parameter for a batch; `heights`/`widths` are the source images' sizes.

    `pca_basis` is (eigvecs (3, 3) with eigenvectors as columns, eigvals (3,)) of the RGB
    covariance on the [0, 1] scale; needed when `spec.pca` is on.
    """
    ids = np.asarray(draw_ids, dtype=np.int64)
    h = np.asarray(heights, dtype=np.float64)
    w = np.asarray(widths, dtype=np.float64)
    b = len(ids)
    roi = _crop_windows(spec, uniforms(seed, epoch, ids, _CROP, 2 * RRC_ATTEMPTS + 2), h, w)
    u_flip = uniforms(seed, epoch, ids, _FLIP, 2)

    u = uniforms(seed, epoch, ids, _HSV, 8)
    on = (u[:, 0] < spec.p_hsv) & spec.hsv

    def pick(col: int, rng: tuple[float, float], identity: float, log: bool = False) -> np.ndarray:
        lo, hi = (math.log(rng[0]), math.log(rng[1])) if log else rng
        value = lo + u[:, col] * (hi - lo)
        return np.where(on, np.exp(value) if log else value, identity).astype(np.float32)

    alpha = np.zeros((b, 3))
    offset = np.zeros((b, 3))
    if spec.pca and spec.pca_sigma > 0:
        if pca_basis is None:
            raise ValueError("spec.pca is on but no PCA basis (eigvecs, eigvals) was given")
        eigvecs, eigvals = (np.asarray(a, dtype=np.float64) for a in pca_basis)
        g = uniforms(seed, epoch, ids, _PCA, 6)
        radius = np.sqrt(-2.0 * np.log1p(-g[:, :3]))  # Box-Muller; 1 - u is in (0, 1]
        alpha = spec.pca_sigma * radius * np.cos(2.0 * np.pi * g[:, 3:])
        offset = (alpha * eigvals[None, :]) @ eigvecs.T * 255.0

    return BatchParams(
        roi=roi.astype(np.float32),
        flip_h=u_flip[:, 0] < spec.p_hflip,
        flip_v=u_flip[:, 1] < spec.p_vflip,
        hue_shift=pick(1, spec.hue_shift, 0.0),
        sat_pow=pick(2, spec.sat_pow, 1.0, log=True),
        sat_scale=pick(3, spec.sat_scale, 1.0),
        sat_shift=pick(4, spec.sat_shift, 0.0),
        val_pow=pick(5, spec.val_pow, 1.0, log=True),
        val_scale=pick(6, spec.val_scale, 1.0),
        val_shift=pick(7, spec.val_shift, 0.0),
        pca_alpha=alpha.astype(np.float32),
        rgb_offset=offset.astype(np.float32),
    )


def _crop_windows(spec: AugmentSpec, u: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, 4) windows y0, x0, y1, x1 in source pixels for the spec's crop mode."""
    if spec.crop == "random_resized_crop":
        return _random_resized_crop(spec, u, h, w)
    out_h, out_w = spec.size
    s = spec.resize / np.minimum(h, w)  # the shorter side goes to `resize`
    if spec.crop == "random_crop":
        y0 = np.floor(u[:, 0] * (np.floor(h * s) - out_h + 1)) / s
        x0 = np.floor(u[:, 1] * (np.floor(w * s) - out_w + 1)) / s
    else:  # center_crop
        y0 = (h - out_h / s) / 2.0
        x0 = (w - out_w / s) / 2.0
    return np.column_stack([y0, x0, y0 + out_h / s, x0 + out_w / s])


def _random_resized_crop(
    spec: AugmentSpec, u: np.ndarray, h: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """torchvision's RandomResizedCrop: up to 10 tries, then a centre crop clamped to `ratio`."""
    n = RRC_ATTEMPTS
    area = (h * w)[:, None] * (spec.scale[0] + u[:, :n] * (spec.scale[1] - spec.scale[0]))
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = np.exp(log_lo + u[:, n : 2 * n] * (log_hi - log_lo))
    cw = np.rint(np.sqrt(area * aspect))
    ch = np.rint(np.sqrt(area / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w[:, None]) & (ch <= h[:, None])
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(h))
    found = ok[rows, first]
    crop_w = np.where(found, cw[rows, first], 0.0)
    crop_h = np.where(found, ch[rows, first], 0.0)
    y0 = np.floor(u[:, 2 * n] * (h - crop_h + 1))
    x0 = np.floor(u[:, 2 * n + 1] * (w - crop_w + 1))

    # fallback: whole image, clamped to the ratio range, centred
    in_ratio = w / h
    fb_w = np.where(in_ratio > spec.ratio[1], np.rint(h * spec.ratio[1]), w)
    fb_h = np.where(in_ratio < spec.ratio[0], np.rint(w / spec.ratio[0]), h)
    crop_w = np.where(found, crop_w, fb_w)
    crop_h = np.where(found, crop_h, fb_h)
    y0 = np.where(found, y0, np.floor((h - crop_h) / 2))
    x0 = np.where(found, x0, np.floor((w - crop_w) / 2))
    return np.column_stack([y0, x0, y0 + crop_h, x0 + crop_w])
