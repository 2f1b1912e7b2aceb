"""API keys and scopes, body and pixel limits, and refusing to run open on a public address."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LiveService, free_port, grey_png, start_service, stop_service, tiny_env

from models.repository import ModelRepository
from service.security import ExposureError, check_exposure
from service.settings import Settings

PNG = {"Content-Type": "image/png"}
PREDICT_KEY, ADMIN_KEY = "p-key-123", "a-key-456"


@pytest.fixture
def guarded_service(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> Iterator[LiveService]:
    keys = f"{PREDICT_KEY}:predict;{ADMIN_KEY}:admin,label"
    env = tiny_env(model_repo, queue_prefix, api_keys=keys, max_body_bytes="2000", max_pixels="100")
    service = start_service(env, tmp_path / "service.log")
    yield service
    stop_service(service)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_each_route_needs_a_key_with_its_scope(guarded_service: LiveService) -> None:
    image = grey_png(0)
    with guarded_service.client() as http:
        anonymous = http.post("/v1/predict", content=image, headers=PNG)
        wrong_key = http.post("/v1/predict", content=image, headers=PNG | bearer("nope"))
        wrong_scope = http.post("/v1/predict", content=image, headers=PNG | bearer(ADMIN_KEY))
        allowed = http.post("/v1/predict", content=image, headers=PNG | bearer(PREDICT_KEY))
        infer = http.post("/v2/models/tiny/infer", json={"inputs": []})
        metrics_as_predictor = http.get("/metrics", headers=bearer(PREDICT_KEY))
        metrics_as_admin = http.get("/metrics", headers=bearer(ADMIN_KEY))
        health = http.get("/v2/health/ready")
    assert (anonymous.status_code, wrong_key.status_code) == (401, 401)
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert "Authorization: Bearer" in anonymous.json()["detail"]
    assert wrong_scope.status_code == 403 and "'predict' scope" in wrong_scope.json()["detail"]
    assert allowed.status_code == 200, allowed.text
    assert infer.status_code == 401
    assert metrics_as_predictor.status_code == 403
    assert metrics_as_admin.status_code == 200
    assert health.status_code == 200


def test_oversized_bodies_and_images_are_refused(guarded_service: LiveService) -> None:
    headers = PNG | bearer(PREDICT_KEY)
    with guarded_service.client() as http:
        big_body = http.post("/v1/predict", content=b"\0" * 3000, headers=headers)
        many_pixels = http.post("/v1/predict", content=grey_png(0, size=11), headers=headers)
        small = http.post("/v1/predict", content=grey_png(0, size=10), headers=headers)
    assert big_body.status_code == 413 and "2000-byte limit" in big_body.json()["detail"]
    assert many_pixels.status_code == 422 and "pixels" in many_pixels.json()["detail"]
    assert small.status_code == 200


def test_open_service_refuses_a_public_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--host", "0.0.0.0", "--port", str(free_port())],
        env={"HALFLABEL_MODEL_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: refusing to listen on 0.0.0.0 with no API keys")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        ({"host": "0.0.0.0"}, False),
        ({"host": "0.0.0.0", "allow_open": True}, True),
        ({"host": "0.0.0.0", "api_keys": "k:predict"}, True),
        ({"host": "127.0.0.1"}, True),
        ({"host": "::1"}, True),
        ({"host": "localhost"}, True),
    ],
)
def test_exposure_rule(settings: dict[str, object], allowed: bool) -> None:
    try:
        check_exposure(Settings(**settings))
    except ExposureError:
        assert not allowed
    else:
        assert allowed


@pytest.mark.parametrize("spec", ["k", "k:", "k:root", ":predict"])
def test_malformed_api_keys_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="KEY:SCOPE"):
        Settings(api_keys=spec)
