"""What the loader yields: numpy arrays or torch tensors, on which device, normalized or not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from augsvc import wire
from augsvc.client.errors import AugsvcError
from augsvc.client.meta import BatchMeta, batch_meta
from augsvc.client.options import check_choice
from augsvc.client.staging import StagingRing
from augsvc.client.transfer import Transfer
from augsvc.wire._proto import augment_pb2 as pb

__all__ = ["OUTPUTS", "RING_SLACK", "Output"]

OUTPUTS = ("numpy", "torch")
# staging buffers beyond the read-ahead: the batch copied ahead, the one yielded and
# the one before it, whose copies may still be running
RING_SLACK = 3
Finish = Callable[[wire.AssembledBatch], tuple[Any, Any, BatchMeta]]
Batch = tuple[Any, Any, BatchMeta]


def _finish_numpy(batch: wire.AssembledBatch) -> Batch:
    return batch.array, batch.labels, batch_meta(batch)


class Output:
    """How assembled batches become yielded ones: buffers, tensors, device, normalization.

    For a CUDA `device`, batches are staged in `ring` (pinned buffers reused across
    passes) and moved by `transfer` (a `CudaTransfer`, made on first use; tests put a
    CPU stand-in there), normalized on the device; see `augsvc.client.transfer`. Other
    outputs are normalized in the consumer's thread. Normalization is float32
    (x - mean) / std with the mean/std of the dataset statistics in use.
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
        self.transfer: Transfer | None = None
        self.ring: StagingRing | None = None
        self._scale_offset: dict[Any, tuple[Any, Any]] = {}

    def parts(self, pin: bool | None, readahead: int) -> tuple[wire.Allocate | None, Finish]:
        """(allocator, finisher) for one pass of `readahead` batches read ahead at most;
        `pin` None: pinned when CUDA is available."""
        if self.kind == "numpy":
            return None, _finish_numpy
        import torch

        from augsvc.client.torch_output import staged_finish, torch_allocator, torch_finisher

        if self.transfer is None and self.device is not None and self.device.type == "cuda":
            from augsvc.client.transfer import CudaTransfer

            self.transfer = CudaTransfer(self.device)
        if self.transfer is not None:
            if self.ring is None:
                self.ring = StagingRing(readahead + RING_SLACK, self.transfer.pin)
            return self.ring.allocate, staged_finish
        pin = bool(torch.cuda.is_available()) if pin is None else pin
        return torch_allocator(pin), torch_finisher(pin)

    def batches(self, get: Callable[[int], Batch], ready: Callable[[int], bool], count: int,
                info: Callable[[], pb.DatasetInfo]) -> Iterator[Batch]:
        """The yielded batches of positions 0..count-1, each from `get(position)` (what
        the pass's finisher made); `ready(position)`: whether it has arrived; `info`
        gives the statistics (asked once)."""
        if self.transfer is not None:
            from augsvc.client.transfer import device_batches

            return device_batches(get, ready, count, self.ring, self.transfer,
                                  lambda images: self._prepare(images, info))
        return (self._deliver(*get(p), info) for p in range(count))

    def release(self) -> None:
        """Let the staging buffers go (a later pass makes new ones)."""
        self.ring = None

    def _deliver(self, images: Any, labels: Any, meta: BatchMeta,
                 info: Callable[[], pb.DatasetInfo]) -> Batch:
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        return self._prepare(images, info), labels, meta

    def _prepare(self, images: Any, info: Callable[[], pb.DatasetInfo]) -> Any:
        """`images` normalized if asked: x * (1 / (255 std)) + (-mean / std), float32."""
        if not self.normalize:
            return images
        scale, offset = self._normalizer(images, info)
        if self.kind == "numpy":
            return images.astype(np.float32) * scale + offset
        import torch

        return torch.addcmul(offset, images, scale)  # on a GPU: one kernel, uint8 in

    def _normalizer(self, images: Any, info: Callable[[], pb.DatasetInfo]) -> tuple[Any, Any]:
        """(1 / (255 std), -mean / std) shaped for the layout; on the images' device."""
        key = images.device if self.kind == "torch" else None
        if key not in self._scale_offset:
            dataset = info()
            mean = np.asarray(dataset.stats.mean, dtype=np.float64)
            std = np.asarray(dataset.stats.std, dtype=np.float64)
            if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
                raise AugsvcError(f"dataset {dataset.name!r}: GetDataset gave no usable "
                                  f"mean/std for normalize=True (source "
                                  f"{dataset.stats.source!r})")
            shape = (3,) if self.layout == "NHWC" else (3, 1, 1)
            scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(shape)
            offset = (-mean / std).astype(np.float32).reshape(shape)
            if key is not None:
                import torch

                scale, offset = torch.from_numpy(scale).to(key), torch.from_numpy(offset).to(key)
            self._scale_offset[key] = (scale, offset)
        return self._scale_offset[key]

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker makes its own
        return {**self.__dict__, "_scale_offset": {}, "transfer": None, "ring": None}
