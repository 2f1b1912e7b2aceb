"""The Kubernetes manifests and Dockerfile are valid and agree with each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[1]
K8S_VERSION = "1.30.0"
DOCUMENTS = [
    (path.name, doc)
    for path in sorted((ROOT / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] == kind]


@pytest.mark.parametrize(
    "document", [doc for _, doc in DOCUMENTS], ids=[f"{n}:{d['kind']}" for n, d in DOCUMENTS]
)
def test_manifest_is_valid_kubernetes(document: dict) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_services_select_existing_pods() -> None:
    pod_labels = [
        w["spec"]["template"]["metadata"]["labels"]
        for w in by_kind("Deployment") + by_kind("StatefulSet")
    ]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), service["metadata"]


def test_redis_keeps_the_queue() -> None:
    config = by_kind("ConfigMap")[0]["data"]["redis.conf"]
    assert "appendonly yes" in config and "maxmemory-policy noeviction" in config


def test_config_names_only_known_settings() -> None:
    from service.settings import Settings

    known = {f"HALFLABEL_{name.upper()}" for name in Settings.model_fields}
    service_config = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] ==
                          "halflabel-service")
    assert set(service_config["data"]) <= known


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
