"""GPU memory for `/metrics`, read through NVML (the driver's libnvidia-ml) with ctypes.

NVML is the management library nvidia-smi uses: it needs no CUDA context and starts no
CUDA, so the metrics process can read it (`augsvc.server.exporter`). The figures are the
device's (every process on the GPU), as nvidia-smi shows them. GPUs are named as
`CUDA_VISIBLE_DEVICES` entries (`augsvc.server.gpus.served_gpus`): a UUID (GPU-...,
MIG-...) is looked up by UUID, an index by NVML's index. NVML counts GPUs in PCI bus
order and CUDA by default fastest first; the two agree on a machine of identical GPUs
(on one with mixed models, set CUDA_DEVICE_ORDER=PCI_BUS_ID).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["GpuMemoryCollector", "Nvml", "NvmlError"]

log = logging.getLogger("augsvc.server")

LIBRARY = "libnvidia-ml.so.1"
_UUID_CHARS = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE


class NvmlError(RuntimeError):
    """NVML is missing or a call failed."""


class _Memory(ctypes.Structure):  # nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


class Nvml:
    """An initialised NVML (NvmlError when the library is missing or will not start)."""

    def __init__(self, library: str = LIBRARY) -> None:
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as exc:
            raise NvmlError(f"cannot load {library}: {exc}") from None
        self._lib.nvmlErrorString.restype = ctypes.c_char_p
        self._check(self._lib.nvmlInit_v2(), "nvmlInit")

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            message = self._lib.nvmlErrorString(code).decode(errors="replace")
            raise NvmlError(f"{what}: {message} (NVML error {code})")

    def handle(self, gpu: str) -> ctypes.c_void_p:
        """The device of a CUDA_VISIBLE_DEVICES entry (an index or a UUID)."""
        handle = ctypes.c_void_p()
        if gpu.isdigit():
            code = self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(int(gpu)),
                                                          ctypes.byref(handle))
        else:
            code = self._lib.nvmlDeviceGetHandleByUUID(gpu.encode(), ctypes.byref(handle))
        self._check(code, f"GPU {gpu}")
        return handle

    def uuid(self, handle: ctypes.c_void_p) -> str:
        buffer = ctypes.create_string_buffer(_UUID_CHARS)
        self._check(self._lib.nvmlDeviceGetUUID(handle, buffer, ctypes.c_uint(_UUID_CHARS)),
                    "nvmlDeviceGetUUID")
        return buffer.value.decode()

    def memory(self, handle: ctypes.c_void_p) -> tuple[int, int]:
        """(used, total) bytes of the device's memory."""
        info = _Memory()
        self._check(self._lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info)),
                    "nvmlDeviceGetMemoryInfo")
        return info.used, info.total


class GpuMemoryCollector(Collector):
    """`augsvc_gpu_memory_used_bytes` and `_total_bytes` of these GPUs, at each scrape;
    nothing (one warning in the log) where NVML cannot be read."""

    def __init__(self, gpus: Sequence[str], library: str = LIBRARY) -> None:
        self._gpus, self._library = tuple(gpus), library
        self._nvml: Nvml | None = None
        self._warned: set[str] = set()

    def describe(self) -> list:
        return []  # registering must not load NVML

    def _warn(self, key: str, exc: NvmlError) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("no GPU memory in /metrics: %s", exc)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None:
            try:
                self._nvml = Nvml(self._library)
            except NvmlError as exc:
                self._warn("", exc)
                return
        labels = ["gpu", "uuid"]
        used = GaugeMetricFamily("augsvc_gpu_memory_used_bytes", "GPU memory in use on the "
                                 "device (all processes), as NVML reports it.", labels=labels)
        total = GaugeMetricFamily("augsvc_gpu_memory_total_bytes", "GPU memory of the "
                                  "device.", labels=labels)
        for gpu in self._gpus:
            try:
                handle = self._nvml.handle(gpu)
                (in_use, size), uuid = self._nvml.memory(handle), self._nvml.uuid(handle)
            except NvmlError as exc:
                self._warn(gpu, exc)
                continue
            used.add_metric([gpu, uuid], in_use)
            total.add_metric([gpu, uuid], size)
        yield used
        yield total
