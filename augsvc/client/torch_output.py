"""Torch output for the loader: pinned batch buffers, tensors, and the IterableDataset wrapper.

Imported only when a loader asks for `output="torch"`: importing augsvc never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from augsvc import wire
from augsvc.client.meta import BatchMeta, batch_meta

if TYPE_CHECKING:
    from augsvc.client.loader import AugmentLoader

__all__ = ["TORCH_EXTRA", "require_torch", "torch_allocator", "torch_dataset_class",
           "torch_device", "torch_finisher"]

TORCH_EXTRA = "pip install 'augsvc[torch]'"


def require_torch() -> None:
    """ImportError saying how to install PyTorch, if it is not importable."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"output='torch' needs PyTorch, which is not installed here "
                          f"({exc}): {TORCH_EXTRA}") from None


def torch_device(device: Any) -> Any:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def torch_allocator(pin: bool) -> wire.Allocate:
    import torch

    dtypes = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        # the array's .base is a tensor on the same (pinned) storage: see _torch_finisher
        return torch.empty(shape, dtype=dtypes[dtype.name], pin_memory=pin).numpy()

    return allocate


def torch_finisher(pin: bool) -> Any:
    import torch

    def finish(batch: wire.AssembledBatch) -> tuple[Any, Any, BatchMeta]:
        images = batch.array.base
        if not isinstance(images, torch.Tensor):  # pragma: no cover - numpy internals changed
            images = torch.from_numpy(batch.array)
        labels = torch.from_numpy(batch.labels)
        if pin:
            labels = labels.pin_memory()
        return images, labels, batch_meta(batch)

    return finish


_TORCH_DATASET: type | None = None


def torch_dataset_class() -> type:
    """`AugmentDataset`, made on first use so that importing augsvc does not import torch."""
    global _TORCH_DATASET
    if _TORCH_DATASET is None:
        import torch.utils.data

        class AugmentDataset(torch.utils.data.IterableDataset):
            """An AugmentLoader as a torch IterableDataset (use DataLoader batch_size=None)."""

            def __init__(self, loader: AugmentLoader) -> None:
                self.loader = loader

            def __iter__(self) -> Iterator[Any]:
                worker = torch.utils.data.get_worker_info()
                if worker is None:
                    return iter(self.loader)
                return self.loader._worker_pass(worker.id, worker.num_workers)

            def __len__(self) -> int:
                return len(self.loader)

        AugmentDataset.__module__ = __name__
        AugmentDataset.__qualname__ = "AugmentDataset"
        _TORCH_DATASET = AugmentDataset
    return _TORCH_DATASET


def __getattr__(name: str) -> Any:
    if name == "AugmentDataset":  # lets pickle (spawned DataLoader workers) find the class
        return torch_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
