"""A stand-in for nvidia-ml-py's `pynvml` on machines without a GPU: two GPUs, the second of
which stops answering after NVML is initialised. Put this folder first on PYTHONPATH."""

from __future__ import annotations

from types import SimpleNamespace

GIB = 2**30


class NVMLError(Exception):
    pass


def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 2


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    if handle == 1:
        raise NVMLError("GPU is lost")
    return SimpleNamespace(total=80 * GIB, free=60 * GIB, used=20 * GIB)


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=37, memory=12)
