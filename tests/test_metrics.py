"""Prometheus scrapes without a key on the metrics port; GPU gauges appear only with a GPU."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import LiveService, free_port, start_service, stop_service, tiny_env
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from models.repository import ModelRepository
from service.gpu_metrics import gpu_metrics

ROOT = Path(__file__).parents[1]
FAKE_NVML = Path(__file__).parent / "fake_nvml"
ADMIN_KEY, PREDICT_KEY = "admin-key-789", "predict-key-789"


def hpa_pod_metrics() -> set[str]:
    """The per-pod metrics the HorizontalPodAutoscaler scales the service on."""
    docs = yaml.safe_load_all((ROOT / "k8s/base/service.yaml").read_text())
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    return {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}


def scrape(url: str) -> dict[str, list[float]]:
    body = httpx.get(url, timeout=10)
    assert body.status_code == 200, body.text
    families = text_string_to_metric_families(body.text)
    return {f.name: [s.value for s in f.samples] for f in families}


@pytest.fixture
def keyed_service_with_metrics_port(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> Iterator[tuple[LiveService, int]]:
    port = free_port()
    env = tiny_env(model_repo, queue_prefix, api_keys=f"{ADMIN_KEY}:admin;{PREDICT_KEY}:predict",
                   metrics_port=str(port))
    # The fake NVML, as the service would see a machine with two GPUs.
    paths = [str(FAKE_NVML), os.environ.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    service = start_service(env, tmp_path / "service.log")
    yield service, port
    stop_service(service)


def test_metrics_port_needs_no_key_while_the_main_port_still_does(
    keyed_service_with_metrics_port: tuple[LiveService, int],
) -> None:
    service, port = keyed_service_with_metrics_port
    metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    with service.client() as http:
        anonymous = http.get("/metrics")
        as_predictor = http.get("/metrics", headers={"Authorization": f"Bearer {PREDICT_KEY}"})
        as_admin = http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    statuses = (anonymous.status_code, as_predictor.status_code, as_admin.status_code)
    assert statuses == (401, 403, 200)
    assert hpa_pod_metrics() <= metrics.keys()  # the HPA's queue depth gets data
    assert "halflabel_labelling_tasks" in metrics  # the shared queue, read from Redis
    # The fake's first GPU; the second stopped answering and is left out, not a failed scrape.
    assert metrics["halflabel_gpu_memory_used_bytes"] == [20 * 2**30]
    assert metrics["halflabel_gpu_memory_total_bytes"] == [80 * 2**30]
    assert metrics["halflabel_gpu_utilization_ratio"] == [0.37]


def test_the_fake_nvml_has_the_real_bindings_names() -> None:
    import pynvml  # nvidia-ml-py, a dev dependency

    fake = {n for n in vars(_load_fake()) if n.startswith("nvml") or n == "NVMLError"}
    assert fake <= set(vars(pynvml)), fake - set(vars(pynvml))


def _load_fake() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_NVML / "pynvml.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NoDriver:
    """pynvml as on a machine without the NVIDIA driver."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError("NVML Shared Library Not Found")


class _NoDevices(_NoDriver):
    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 0

    def nvmlShutdown(self) -> None:
        self.shut_down = True


@pytest.mark.parametrize("nvml", [None, _NoDriver(), _NoDevices()],
                         ids=["not installed", "no driver", "no GPU"])
def test_without_a_gpu_there_are_no_gpu_gauges_and_no_error(
    nvml: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: `import pynvml` fails
    with gpu_metrics() as collector:
        exported = generate_latest(REGISTRY).decode()
    assert collector is None
    assert "halflabel_gpu_" not in exported
    assert getattr(nvml, "shut_down", True)
