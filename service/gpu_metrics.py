"""GPU memory and utilisation gauges, read through NVML at scrape time.

Only where NVML finds an NVIDIA GPU and nvidia-ml-py (`pynvml`) is installed: the service extra
brings it where onnxruntime-gpu runs. Anywhere else the gauges are simply absent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.metrics import EXPORTED

log = logging.getLogger(__name__)


class GpuMetrics(Collector):
    """Memory in use, total memory and utilisation of each GPU the process can see."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml
        self.handles = [
            nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())
        ]

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "halflabel_gpu_memory_used_bytes", "GPU memory in use, by all processes", labels=["gpu"]
        )
        total = GaugeMetricFamily("halflabel_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        busy = GaugeMetricFamily(
            "halflabel_gpu_utilization_ratio",
            "Fraction of NVML's last sample period in which a kernel ran on the GPU",
            labels=["gpu"],
        )
        for index, handle in enumerate(self.handles):
            try:
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = self.nvml.nvmlDeviceGetUtilizationRates(handle)
            except self.nvml.NVMLError:
                continue  # a GPU that stops answering shows as missing series, not a failed scrape
            gpu = [str(index)]
            used.add_metric(gpu, memory.used)
            total.add_metric(gpu, memory.total)
            busy.add_metric(gpu, utilization.gpu / 100)
        yield from (used, total, busy)


@contextlib.contextmanager
def gpu_metrics() -> Iterator[GpuMetrics | None]:
    """Export the GPU gauges while inside when there is a GPU; else do nothing (yields None)."""
    nvml = _open_nvml()
    if nvml is None:
        yield None
        return
    collector = GpuMetrics(nvml)
    EXPORTED.register(collector)
    try:
        yield collector
    finally:
        EXPORTED.unregister(collector)
        nvml.nvmlShutdown()


def _open_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver, no GPU: the usual case on CPU machines
        log.debug("no GPU metrics: %s", exc)
        return None
    if pynvml.nvmlDeviceGetCount() == 0:
        pynvml.nvmlShutdown()
        return None
    return pynvml
