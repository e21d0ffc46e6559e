"""The DALI pipeline: encoded images and parameter arrays in, one contiguous batch out.

Graph (one per spec and device): decode (CPU, or `mixed` with nvJPEG / the hardware
decoder on GPU) -> `fn.resize` of the host-computed window (crop and resize in one
operator) -> the exact colour kernel (`augsvc.engine.kernels`) -> `fn.flip` -> optional
`fn.crop_mirror_normalize` for normalisation, layout and dtype. Flipping after the
colour kernel equals DESIGN's crop -> flip -> colour order, since colour is per pixel.

Every random value comes from `augsvc.core.draws` as one array per parameter per batch,
fed through `fn.external_source`; DALI's own random operators are never used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from augsvc.core.draws import BatchParams
from augsvc.core.spec import AugmentSpec

__all__ = ["DEVICES", "AugmentPipeline", "PipelineError"]

DEVICES = ("cpu", "gpu")
_INTERP = {"linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC",
           "triangular": "INTERP_TRIANGULAR", "nearest": "INTERP_NN"}
_DTYPES = {"uint8": "UINT8", "float16": "FLOAT16", "float32": "FLOAT"}


class PipelineError(RuntimeError):
    """DALI failed to build or run a batch."""


class AugmentPipeline:
    """One DALI pipeline for a fixed spec, device and normalisation statistics.

    `run()` takes up to `max_batch_size` encoded images (1-D uint8 arrays) and the
    batch's `BatchParams`, and returns a new C-contiguous array of shape
    (B, H, W, 3) or (B, 3, H, W) in the spec's dtype.
    """

    def __init__(
        self,
        spec: AugmentSpec,
        *,
        max_batch_size: int,
        device: str = "cpu",
        num_threads: int | None = None,
        device_id: int | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.spec = spec.validate()
        self.device = device
        self.max_batch_size = max_batch_size
        if device == "gpu" and device_id is None:
            device_id = 0
        self._pipe = self._build(
            num_threads or min(8, os.cpu_count() or 1),
            device_id if device == "gpu" else None,
            np.asarray(mean, dtype=np.float64),
            np.asarray(std, dtype=np.float64),
        )

    def _build(self, num_threads: int, device_id: int | None, mean: np.ndarray,
               std: np.ndarray):
        from nvidia.dali import fn, pipeline_def, types

        spec, device = self.spec, self.device

        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=num_threads,
            device_id=device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip_h = fn.external_source(name="flip_h", dtype=types.INT32, ndim=0)
            flip_v = fn.external_source(name="flip_v", dtype=types.INT32, ndim=0)
            images = fn.decoders.image(
                encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
            )
            images = fn.resize(
                images,
                size=list(spec.size),
                roi_start=roi_start,
                roi_end=roi_end,
                roi_relative=False,
                interp_type=getattr(types, _INTERP[spec.interpolation]),
                antialias=spec.antialias,
                dtype=types.UINT8,
            )
            if spec.colour:
                from augsvc.engine import kernels

                params = fn.external_source(name="color", dtype=types.FLOAT, ndim=1)
                images = kernels.color(images, params, device)
            images = fn.flip(images, horizontal=flip_h, vertical=flip_v)
            if spec.normalize or spec.layout != "NHWC" or spec.dtype != "uint8":
                norm = spec.normalize
                images = fn.crop_mirror_normalize(
                    images,
                    dtype=getattr(types, _DTYPES[spec.dtype]),
                    output_layout="CHW" if spec.layout == "NCHW" else "HWC",
                    mean=list(mean * 255.0) if norm else [0.0],
                    std=list(std * 255.0) if norm else [1.0],
                )
            return images

        pipe = graph()
        try:
            pipe.build()
        except RuntimeError as exc:
            raise PipelineError(f"building the DALI pipeline failed: {exc}") from exc
        return pipe

    def run(self, encoded: Sequence[np.ndarray], params: BatchParams) -> np.ndarray:
        """Augment one batch; `encoded[i]` gets the parameters `params[i]`."""
        n = len(encoded)
        if n != len(params):
            raise ValueError(f"{n} images but {len(params)} parameter sets")
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch of {n} images; this pipeline takes 1..{self.max_batch_size}")
        pipe = self._pipe
        pipe.feed_input("encoded", list(encoded))
        pipe.feed_input("roi_start", np.ascontiguousarray(params.roi[:, :2]))
        pipe.feed_input("roi_end", np.ascontiguousarray(params.roi[:, 2:]))
        pipe.feed_input("flip_h", params.flip_h.astype(np.int32))
        pipe.feed_input("flip_v", params.flip_v.astype(np.int32))
        if self.spec.colour:
            pipe.feed_input("color", params.color_matrix())
        try:
            (out,) = pipe.run()
        except RuntimeError as exc:
            raise PipelineError(f"DALI failed on this batch: {exc}") from exc
        if self.device == "gpu":
            out = out.as_cpu()
        return np.array(out.as_tensor(), copy=True, order="C")
