"""RGB statistics of a dataset: mean, std, covariance and its eigenbasis (fancy PCA).

Everything is on RGB pixels scaled to [0, 1]; the covariance is the population
covariance over all pixels of all images (every pixel weighs the same).

Eigenvectors are the COLUMNS of `eigvecs` (numpy.linalg.eigh convention), ordered
by descending eigenvalue. Sign rule for computed stats: each column's component of
largest magnitude is positive (the first such component on ties). Eigenvalues are
clipped at 0 (a covariance is positive semi-definite; rounding can dip below).
The fancy-PCA offset is `eigvecs @ (alpha * eigvals)`, see `augsvc.core.draws`.

File format (JSON, `save`/`load`; what `augsvc stats PATH` writes):

    {
      "format": "augsvc-stats/1",
      "source": "<what the numbers were computed from>",
      "num_images": 1281167, "num_pixels": 140000000000,
      "mean": [r, g, b], "std": [r, g, b],
      "cov": [[3 numbers], [..], [..]],       # row-major, RGB order
      "eigvals": [l0, l1, l2],                # descending
      "eigvecs": [[3 numbers], [..], [..]]    # row-major; column j is eigenvector j
    }

Unknown keys, a missing key or another `format` are errors (StatsError).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "IMAGENET",
    "DatasetStats",
    "PixelMoments",
    "StatsError",
    "load",
]

log = logging.getLogger(__name__)

FORMAT = "augsvc-stats/1"
_KEYS = ("format", "source", "num_images", "num_pixels", "mean", "std", "cov", "eigvals",
         "eigvecs")


class StatsError(ValueError):
    """Statistics that are missing, malformed or cannot be computed."""


@dataclass(frozen=True, eq=False)
class DatasetStats:
    """RGB statistics on the [0, 1] scale (module docstring for conventions)."""

    mean: np.ndarray  # (3,)
    std: np.ndarray  # (3,)
    cov: np.ndarray  # (3, 3)
    eigvals: np.ndarray  # (3,) descending
    eigvecs: np.ndarray  # (3, 3), column j is eigenvector j
    num_images: int
    num_pixels: int
    source: str

    def __post_init__(self) -> None:
        for name, shape in (("mean", (3,)), ("std", (3,)), ("cov", (3, 3)),
                            ("eigvals", (3,)), ("eigvecs", (3, 3))):
            try:
                value = np.array(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise StatsError(f"{name}: expected numbers, got {getattr(self, name)!r}") from exc
            if value.shape != shape or not np.isfinite(value).all():
                raise StatsError(f"{name}: expected finite numbers of shape {shape}, "
                                 f"got {value.tolist()!r}")
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @classmethod
    def from_moments(
        cls, mean: np.ndarray, cov: np.ndarray, num_images: int, num_pixels: int, source: str
    ) -> DatasetStats:
        """Stats from a mean and covariance: std, eigenbasis (sorted, sign-normalised)."""
        cov = np.asarray(cov, dtype=np.float64)
        cov = (cov + cov.T) / 2
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
        pivot = np.argmax(np.abs(eigvecs), axis=0)
        eigvecs = eigvecs * np.sign(eigvecs[pivot, np.arange(3)])[None, :]
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        return cls(mean, std, cov, eigvals, eigvecs, int(num_images), int(num_pixels), source)

    @functools.cached_property
    def digest(self) -> str:
        """16 hex digits of the SHA-256 of mean, std, eigvals and eigvecs (little-endian
        float64): what the augmentations use, so equal digests make equal batches."""
        sha = hashlib.sha256()
        for values in (self.mean, self.std, self.eigvals, self.eigvecs):
            sha.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
        return sha.hexdigest()[:16]

    def pca_basis(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigvecs, eigvals), what `augsvc.core.draws.draw_params` takes as `pca_basis`."""
        return self.eigvecs, self.eigvals

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of the module docstring's file format."""
        return {
            "format": FORMAT,
            "source": self.source,
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "cov": self.cov.tolist(),
            "eigvals": self.eigvals.tolist(),
            "eigvecs": self.eigvecs.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetStats:
        """Parse `to_dict` output; StatsError on another format, missing or unknown keys."""
        if not isinstance(data, dict):
            raise StatsError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise StatsError(f"expected format {FORMAT!r}, got {data.get('format')!r}")
        missing = [k for k in _KEYS if k not in data]
        unknown = sorted(set(data) - set(_KEYS))
        if missing or unknown:
            raise StatsError(f"missing keys {missing}, unknown keys {unknown}")
        for key in ("num_images", "num_pixels"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
                raise StatsError(f"{key}: expected a non-negative integer, got {data[key]!r}")
        fields = {k: data[k] for k in _KEYS if k != "format"}
        return cls(**fields)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON file (atomically); return its path."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def summary(self) -> str:
        """A few human-readable lines: mean, std, eigenvalues, eigenvectors, counts."""

        def row(values: np.ndarray) -> str:
            return "  ".join(f"{v:8.4f}" for v in values)

        lines = [
            f"source    {self.source}",
            f"images    {self.num_images:,} ({self.num_pixels:,} pixels)",
            "            R         G         B    (pixels scaled to [0, 1])",
            f"mean      {row(self.mean)}",
            f"std       {row(self.std)}",
            f"eigvals   {row(self.eigvals)}",
            "eigvecs   (column j is eigenvector j)",
        ]
        lines += [f"          {row(r)}" for r in self.eigvecs]
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class PixelMoments:
    """Per-image RGB pixel moments on the 0..255 scale, what `DatasetStats` is pooled from.

    Image i has `pixels[i]` pixels with channel sums `sums[i]` (3,) and sums of products
    `products[i]` (3, 3). All are sums of integers, so float64 holds them exactly
    below ~1e11 pixels, and pooling them gives the same numbers as one pass over all
    pixels.
    """

    sums: np.ndarray  # (n, 3)
    products: np.ndarray  # (n, 3, 3)
    pixels: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.pixels)

    def stats(self, source: str) -> DatasetStats:
        """The pooled statistics of every image (every pixel weighs the same)."""
        if len(self) == 0 or self.pixels.sum() == 0:
            raise StatsError("no pixels to compute statistics from")
        mean, cov = _pooled(self.sums.sum(axis=0), self.products.sum(axis=0), self.pixels.sum())
        return DatasetStats.from_moments(mean, cov, len(self), int(self.pixels.sum()), source)

    def eigvals_stderr(self, replicates: int = 200, seed: int = 0) -> np.ndarray:
        """(3,) standard errors of the eigenvalues (descending, [0, 1] scale) by a bootstrap
        over images: `replicates` resamples of the n images with replacement, drawn from
        `seed` (deterministic), each pooled like `stats`; their standard deviation.

        The image, not the pixel, is the unit resampled: the pixels of one image are far
        from independent, so a per-pixel error would be much too small. 0 for 1 image.
        """
        n = len(self)
        if n < 2:
            return np.zeros(3)
        rng = np.random.default_rng(seed)
        values = np.empty((replicates, 3))
        for r in range(replicates):
            weights = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
            pixels = weights @ self.pixels
            if pixels == 0:
                values[r] = 0.0
                continue
            _, cov = _pooled(weights @ self.sums, np.tensordot(weights, self.products, 1), pixels)
            values[r] = np.clip(np.sort(np.linalg.eigvalsh((cov + cov.T) / 2))[::-1], 0, None)
        return values.std(axis=0, ddof=1)


def _pooled(total: np.ndarray, products: np.ndarray, pixels: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) on the [0, 1] scale from 0..255 sums over `pixels` pixels."""
    mean = total / pixels
    cov = products / pixels - np.outer(mean, mean)
    return mean / 255.0, cov / 255.0**2


def load(path: str | os.PathLike[str]) -> DatasetStats:
    """Read a stats JSON file; StatsError if it is missing or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StatsError(f"no statistics file {path}") from exc
    except (OSError, ValueError) as exc:
        raise StatsError(f"cannot read statistics file {path}: {exc}") from exc
    try:
        return DatasetStats.from_dict(data)
    except StatsError as exc:
        raise StatsError(f"{path}: {exc}") from exc


def _imagenet() -> DatasetStats:
    """AlexNet's ImageNet basis as published in fb.resnet.torch (values kept as printed)."""
    eigvals = np.array([0.2175, 0.0188, 0.0045])
    eigvecs = np.array([[-0.5675, 0.7192, 0.4009],
                        [-0.5808, -0.0045, -0.8140],
                        [-0.5836, -0.6948, 0.4203]])
    return DatasetStats(
        mean=np.array([0.485, 0.456, 0.406]),
        std=np.array([0.229, 0.224, 0.225]),
        cov=eigvecs @ np.diag(eigvals) @ eigvecs.T,
        eigvals=eigvals,
        eigvecs=eigvecs,
        num_images=0,
        num_pixels=0,
        source="imagenet (mean/std: torchvision; eigenbasis: AlexNet via fb.resnet.torch)",
    )


#: The usual ImageNet preset. mean/std are torchvision's; eigvals/eigvecs are the
#: published AlexNet basis with its signs as printed (not the computed-stats sign
#: rule); cov = V diag(eigvals) V^T is reconstructed from them, so its diagonal does
#: not match std**2 (the two were measured separately).
IMAGENET = _imagenet()
