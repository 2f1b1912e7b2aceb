"""The walking skeleton: train on digits → publish → serve over real HTTP → queue in real Redis."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import REDIS_URL, start_service, stop_service

from models.queue import QueueKeys
from models.repository import ModelRepository

EXAMPLE = Path(__file__).parents[1] / "docs" / "example-digit.png"
# The path matters here, not accuracy: a short budget, no refinement stage.
QUICK_FIT = ["--supervised-steps", "30", "--pseudo-steps", "30", "--refine-steps", "0",
             "--no-progress"]


@pytest.mark.slow
def test_train_publish_serve_and_queue(tmp_path: Path, queue_prefix: str) -> None:
    model_dir = tmp_path / "store"
    fit = [sys.executable, "-m", "trainer", "fit", "--data", "digits", "--name", "digits",
           "--model-dir", str(model_dir), *QUICK_FIT]
    trained = subprocess.run(fit, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert "published digits:1" in trained.stdout
    manifest = ModelRepository(model_dir).resolve("digits").manifest
    assert manifest.classes == tuple(str(d) for d in range(10))

    again = subprocess.run([*fit, "--if-empty"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "skipping" in again.stdout
    assert ModelRepository(model_dir).versions("digits") == [1]

    # Threshold 0 queues every input, so the Redis half of the path is exercised for sure.
    service = start_service(
        {"HALFLABEL_MODEL_DIR": str(model_dir), "HALFLABEL_QUEUE_PREFIX": queue_prefix,
         "HALFLABEL_ENTROPY_THRESHOLD": "0"},
        tmp_path / "service.log",
    )
    try:
        with service.client() as client:
            response = client.post("/v1/predict", content=EXAMPLE.read_bytes(),
                                   headers={"Content-Type": "image/png"})
    finally:
        stop_service(service)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["version"]) == ("digits", 1)
    (prediction,) = body["predictions"]
    assert prediction["label"] == manifest.classes[prediction["class_index"]]
    assert 0 <= prediction["normalized_entropy"] <= 1
    assert prediction["entropy"] == pytest.approx(
        prediction["normalized_entropy"] * math.log(10), abs=1e-4)
    assert prediction["queued_for_labelling"] is True

    client = redis.Redis.from_url(REDIS_URL)
    keys = QueueKeys(queue_prefix)
    task_id = prediction["input_sha256"]
    assert client.zscore(keys.pending, task_id) is not None
    assert client.get(keys.image(task_id)) == EXAMPLE.read_bytes()
