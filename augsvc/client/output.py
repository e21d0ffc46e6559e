"""What the loader yields: numpy arrays or torch tensors, on which device, normalized or not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from augsvc import wire
from augsvc.client.errors import AugsvcError
from augsvc.client.meta import BatchMeta, batch_meta
from augsvc.client.options import check_choice
from augsvc.wire._proto import augment_pb2 as pb

__all__ = ["OUTPUTS", "Output"]

OUTPUTS = ("numpy", "torch")
Finish = Callable[[wire.AssembledBatch], tuple[Any, Any, BatchMeta]]


def _finish_numpy(batch: wire.AssembledBatch) -> tuple[Any, Any, BatchMeta]:
    return batch.array, batch.labels, batch_meta(batch)


class Output:
    """How assembled batches become yielded ones: buffers, tensors, device, normalization.

    `normalize` is done by `deliver`, in the consumer's thread (on its CUDA stream for a
    GPU `device`), as float32 with the mean/std of the dataset statistics in use.
    """

    def __init__(self, kind: str, device: Any, normalize: bool, layout: str) -> None:
        check_choice("output", kind, OUTPUTS)
        self.kind, self.normalize, self.layout = kind, normalize, layout
        self.device = None
        if kind == "torch":
            from augsvc.client.torch_output import require_torch

            require_torch()
        if device is not None:
            if kind != "torch":
                raise ValueError("device needs output='torch'")
            from augsvc.client.torch_output import torch_device

            self.device = torch_device(device)
        self._scale_shift: dict[Any, tuple[Any, Any]] = {}

    def parts(self, pin: bool | None) -> tuple[wire.Allocate | None, Finish]:
        """(allocator, finisher) for one pass; `pin` None: pinned when CUDA is available."""
        if self.kind == "numpy":
            return None, _finish_numpy
        import torch

        from augsvc.client.torch_output import torch_allocator, torch_finisher

        pin = bool(torch.cuda.is_available()) if pin is None else pin
        return torch_allocator(pin), torch_finisher(pin)

    def deliver(self, images: Any, labels: Any,
                info: Callable[[], pb.DatasetInfo]) -> tuple[Any, Any]:
        """Move to the device and normalize; `info` gives the statistics (asked once)."""
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        if self.normalize:
            scale, shift = self._normalizer(images, info)
            if self.kind == "numpy":
                images = images.astype(np.float32) * scale - shift
            else:
                images = images.float().mul_(scale).sub_(shift)
        return images, labels

    def _normalizer(self, images: Any, info: Callable[[], pb.DatasetInfo]) -> tuple[Any, Any]:
        """(1 / (255 std), mean / std) shaped for the layout; on the images' device."""
        key = images.device if self.kind == "torch" else None
        if key not in self._scale_shift:
            dataset = info()
            mean = np.asarray(dataset.stats.mean, dtype=np.float64)
            std = np.asarray(dataset.stats.std, dtype=np.float64)
            if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
                raise AugsvcError(f"dataset {dataset.name!r}: GetDataset gave no usable "
                                  f"mean/std for normalize=True (source "
                                  f"{dataset.stats.source!r})")
            shape = (3,) if self.layout == "NHWC" else (3, 1, 1)
            scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(shape)
            shift = (mean / std).astype(np.float32).reshape(shape)
            if key is not None:
                import torch

                scale, shift = torch.from_numpy(scale).to(key), torch.from_numpy(shift).to(key)
            self._scale_shift[key] = (scale, shift)
        return self._scale_shift[key]

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker makes its own tensors
        return {**self.__dict__, "_scale_shift": {}}
