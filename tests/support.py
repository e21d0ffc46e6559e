"""Small helpers shared by the tests: GPU detection and in-memory image encoding."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image


@functools.cache
def gpu_count() -> int:
    """CUDA devices DALI can see (0 on a machine without a driver)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return int(GetCUDADeviceCount())
    except Exception:  # no driver, no DALI CUDA runtime: no GPU
        return 0


def requires_gpu(test: Callable) -> Callable:
    """Mark a test `gpu` (select with `pytest -m gpu`) and skip it where no GPU is visible."""
    return pytest.mark.gpu(pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU")(test))


def coordinate_image(h: int, w: int) -> np.ndarray:
    """uint8 HWC with R = x, G = y, B = 255 - x (h, w <= 256): a ramp that resizing keeps exact."""
    if h > 256 or w > 256:
        raise ValueError("coordinates must fit in one uint8 level per pixel")
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = "PNG", **options: object) -> np.ndarray:
    """Encode an HWC uint8 image in memory; the bytes as a uint8 array (what DALI takes)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **options)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)
