"""The DALI pipeline: encoded images and parameter arrays in, one contiguous batch out.

Graph (one per spec and device): `fn.decoders.image_slice` decodes only the crop's
whole-pixel window (`BatchParams.window`; CPU, or `mixed` with nvJPEG / the hardware
decoder on GPU) -> `fn.resize` of the crop (`BatchParams.roi`, relative to that
window; the filter clamps at the window's edges) -> the exact colour kernel
(`augsvc.engine.kernels`) -> `fn.flip` -> optional `fn.crop_mirror_normalize` for
normalisation, layout and dtype. Flipping after the colour kernel equals DESIGN's
crop -> flip -> colour order, since colour is per pixel.

On the GPU the graph ends with a copy to host memory inside the iteration (`.cpu()`),
so the device-to-host copy of batch k overlaps the GPU work of batch k+1.

Batches run asynchronously: `submit` feeds one and schedules it, `collect` returns the
oldest submitted one, so the caller can prepare and encode batches while DALI runs the
next (DALI's dynamic executor; an error stays with its own iteration). The array
`collect` returns is a view of DALI's output memory (no copy), which stays valid for as
long as the array is referenced.

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

    `run()` (or `submit()` then `collect()`) takes up to `max_batch_size` encoded images
    (1-D uint8 arrays) and the batch's `BatchParams`, and returns a C-contiguous array of
    shape (B, H, W, 3) or (B, 3, H, W) in the spec's dtype, a view of DALI's output.
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
        self.in_flight = 0  # batches submitted and not collected yet
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
            window_start = fn.external_source(name="window_start", dtype=types.INT32, ndim=1)
            window_shape = fn.external_source(name="window_shape", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip_h = fn.external_source(name="flip_h", dtype=types.INT32, ndim=0)
            flip_v = fn.external_source(name="flip_v", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(
                encoded, window_start, window_shape, axis_names="HW",
                device="mixed" if device == "gpu" else "cpu", output_type=types.RGB
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
            return images.cpu() if device == "gpu" else images

        pipe = graph()
        try:
            pipe.build()
        except RuntimeError as exc:
            raise PipelineError(f"building the DALI pipeline failed: {exc}") from exc
        return pipe

    def submit(self, encoded: Sequence[np.ndarray], params: BatchParams) -> None:
        """Feed one batch and schedule it; `encoded[i]` gets the parameters `params[i]`."""
        n = len(encoded)
        if n != len(params):
            raise ValueError(f"{n} images but {len(params)} parameter sets")
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch of {n} images; this pipeline takes 1..{self.max_batch_size}")
        pipe = self._pipe
        pipe.feed_input("encoded", list(encoded))
        for name, value in _window_inputs(params).items():
            pipe.feed_input(name, value)
        pipe.feed_input("flip_h", params.flip_h.astype(np.int32))
        pipe.feed_input("flip_v", params.flip_v.astype(np.int32))
        if self.spec.colour:
            pipe.feed_input("color", params.color_matrix())
        pipe.schedule_run()
        self.in_flight += 1

    def collect(self) -> np.ndarray:
        """The oldest submitted batch, waiting for it; PipelineError if DALI failed on it."""
        if not self.in_flight:
            raise RuntimeError("collect() without a submitted batch")
        self.in_flight -= 1
        try:
            (out,) = self._pipe.outputs()
        except RuntimeError as exc:
            raise PipelineError(f"DALI failed on this batch: {exc}") from exc
        # a view (no copy) that keeps DALI's buffer alive; ascontiguousarray copies only if
        # DALI ever hands back a non-contiguous batch
        return np.ascontiguousarray(np.asarray(out.as_tensor()))

    def run(self, encoded: Sequence[np.ndarray], params: BatchParams) -> np.ndarray:
        """Augment one batch now (nothing else may be in flight)."""
        if self.in_flight:
            raise RuntimeError(f"run() with {self.in_flight} batch(es) in flight; collect them")
        self.submit(encoded, params)
        return self.collect()


def _window_inputs(params: BatchParams) -> dict[str, np.ndarray]:
    """The decode window (integer start and shape) and the crop relative to it."""
    window = params.window
    start = np.ascontiguousarray(window[:, :2])
    crop = params.roi - np.tile(start, 2).astype(np.float32)  # exact: whole-pixel offsets
    return {"window_start": start,
            "window_shape": np.ascontiguousarray(window[:, 2:] - start),
            "roi_start": np.ascontiguousarray(crop[:, :2]),
            "roi_end": np.ascontiguousarray(crop[:, 2:])}
