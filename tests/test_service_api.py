"""The /v1 predict API through the real service process, queueing into the real Redis."""

from __future__ import annotations

import hashlib
import time
from base64 import b64encode

import pytest
import redis
from conftest import (
    REDIS_URL,
    LiveService,
    grey_png,
)

from models.queue import LabellingQueue, QueueKeys

PNG = {"Content-Type": "image/png"}


def wait_for_key(client: redis.Redis, key: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.exists(key):
            return True
        time.sleep(0.05)
    return False


def test_confident_input_is_predicted_and_not_queued(
    live_service: LiveService, queue_prefix: str
) -> None:
    image = grey_png(0)
    with live_service.client() as http:
        response = http.post("/v1/predict", content=image, headers=PNG)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["version"]) == ("tiny", 1)
    [prediction] = body["predictions"]
    assert prediction["label"] == "dark" and prediction["class_index"] == 0
    assert prediction["confidence"] > 0.99
    best = {"label": "dark", "probability": prediction["confidence"]}
    assert prediction["probabilities"][0] == best
    assert sum(p["probability"] for p in prediction["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert 0 <= prediction["normalized_entropy"] < 0.01
    assert prediction["input_sha256"] == hashlib.sha256(image).hexdigest()
    assert prediction["queued_for_labelling"] is False
    time.sleep(0.5)  # a wrong push would have landed by now
    assert not redis.Redis.from_url(REDIS_URL).exists(QueueKeys(queue_prefix).pending)


def test_uncertain_input_is_queued_with_its_image(
    live_service: LiveService, queue_prefix: str
) -> None:
    image = grey_png(128)
    with live_service.client() as http:
        response = http.post("/v1/predict", content=image, headers=PNG, params={"top_k": 1})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert prediction["normalized_entropy"] > 0.9
    assert prediction["queued_for_labelling"] is True
    assert len(prediction["probabilities"]) == 1
    keys, task_id = QueueKeys(queue_prefix), prediction["input_sha256"]
    client = redis.Redis.from_url(REDIS_URL)
    assert wait_for_key(client, keys.task(task_id)), "the task never reached Redis"
    assert client.get(keys.image(task_id)) == image
    assert client.zscore(keys.pending, task_id) == pytest.approx(prediction["normalized_entropy"])
    task = LabellingQueue(client, queue_prefix).task(task_id)
    assert task is not None
    record = task.record
    assert (record.model_name, record.model_version) == ("tiny", 1)
    assert record.content_type == "image/png"
    assert record.entropy == pytest.approx(prediction["entropy"])
    assert [guess.label for guess in record.guesses] == ["light", "dark"]  # all classes, top_k=1


def test_multipart_and_json_bodies_predict_every_image(shared_service: LiveService) -> None:
    images = [grey_png(0), grey_png(255), grey_png(0, size=8)]
    files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    instances = {"instances": [{"b64": b64encode(image).decode()} for image in images]}
    with shared_service.client() as http:
        multipart = http.post("/v1/models/tiny/predict", files=files)
        as_json = http.post("/v1/predict", json=instances)
    for response in (multipart, as_json):
        assert response.status_code == 200, response.text
        labels = [p["label"] for p in response.json()["predictions"]]
        assert labels == ["dark", "light", "dark"]


@pytest.mark.parametrize(
    ("path", "content", "content_type", "params", "status"),
    [
        ("/v1/predict", b"not an image", "image/png", {}, 422),
        ("/v1/predict", grey_png(0), "text/plain", {}, 415),
        ("/v1/predict", b"", "image/png", {}, 400),
        ("/v1/predict", b'{"instances": []}', "application/json", {}, 400),
        ("/v1/predict", b'{"instances": [{"b64": "%%%"}]}', "application/json", {}, 400),
        ("/v1/predict", grey_png(0), "image/png", {"top_k": 0}, 400),
        ("/v1/predict", grey_png(0), "image/png", {"version": 7}, 404),
        ("/v1/models/nope/predict", grey_png(0), "image/png", {}, 404),
        ("/v1/nowhere", grey_png(0), "image/png", {}, 404),
    ],
)
def test_bad_requests_get_a_problem_json_naming_the_problem(
    shared_service: LiveService,
    path: str,
    content: bytes,
    content_type: str,
    params: dict[str, int],
    status: int,
) -> None:
    with shared_service.client() as http:
        response = http.post(path, content=content, headers={"Content-Type": content_type},
                             params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["detail"] and "\n" not in problem["detail"]


def test_health_schema_and_first_request_hint(shared_service: LiveService) -> None:
    with shared_service.client() as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        schema = http.get("/schema/openapi.json").json()
    assert {"/v1/predict", "/v1/models/{name}/predict"} <= set(schema["paths"])
    body_types = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "multipart/form-data", "application/json"} <= set(body_types)
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert infer["application/json"]["schema"]["required"] == ["inputs"]
    assert "application/octet-stream" in infer
    port = shared_service.url.rsplit(":", 1)[1]
    hints = [line for line in shared_service.log.read_text().splitlines() if "curl" in line]
    assert len(hints) == 1, hints
    assert f"http://127.0.0.1:{port}/v1/predict" in hints[0]
    assert "--data-binary @docs/example-digit.png" in hints[0]


def test_oip_metadata_and_readiness(shared_service: LiveService) -> None:
    with shared_service.client() as http:
        assert http.get("/v2").json()["name"] == "halflabel"
        metadata = http.get("/v2/models/tiny").json()
        assert http.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        assert http.get("/v2/models/other").status_code == 404
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 4, 4]}]
    assert metadata["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert metadata["parameters"]["classes"] == ["dark", "light"]


def test_oip_infer_takes_preprocessed_fp32_and_raw_uint8_tensors(
    shared_service: LiveService,
) -> None:
    dark, light = [-2.0] * 16, [2.0] * 16  # normalised pixels: black, white
    fp32 = {"id": "r1", "inputs": [
        {"name": "image", "shape": [2, 1, 4, 4], "datatype": "FP32", "data": dark + light}
    ]}
    uint8 = {"inputs": [
        {"name": "image", "shape": [2, 4, 4], "datatype": "UINT8", "data": [0] * 16 + [255] * 16}
    ], "outputs": [{"name": "probabilities"}]}
    with shared_service.client() as http:
        by_fp32 = http.post("/v2/models/tiny/infer", json=fp32)
        by_uint8 = http.post("/v2/models/tiny/infer", json=uint8)
    assert by_fp32.status_code == 200, by_fp32.text
    assert by_uint8.status_code == 200, by_uint8.text
    body = by_fp32.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "1", "r1")
    outputs = {output["name"]: output for output in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 2]
    assert outputs["entropy"]["shape"] == [2]
    [probabilities] = by_uint8.json()["outputs"]
    for output in (outputs["probabilities"], probabilities):
        dark_p, _, _, light_p = output["data"]
        assert dark_p > 0.99 and light_p > 0.99


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "image", "shape": [1, 1, 4, 5], "datatype": "FP32", "data": [0.0] * 20},
        {"name": "image", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": [0.0] * 3},
        {"name": "image", "shape": [1, 4, 4], "datatype": "INT8", "data": [0] * 16},
        {"name": "image", "shape": [1, 4, 4], "datatype": "UINT8", "data": [300] * 16},
    ],
)
def test_oip_infer_refuses_malformed_tensors(
    shared_service: LiveService, tensor: dict[str, object]
) -> None:
    with shared_service.client() as http:
        response = http.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]


def test_oip_infer_refuses_unknown_outputs(shared_service: LiveService) -> None:
    tensor = {"name": "image", "shape": [1, 4, 4], "datatype": "UINT8", "data": [0] * 16}
    with shared_service.client() as http:
        response = http.post("/v2/models/tiny/infer",
                             json={"inputs": [tensor], "outputs": [{"name": "logits"}]})
    assert response.status_code == 400, response.text
    assert "unknown output 'logits'" in response.json()["error"]


def test_metrics_count_requests_batches_and_uncertainty(shared_service: LiveService) -> None:
    with shared_service.client() as http:
        assert http.post("/v1/predict", content=grey_png(129), headers=PNG).status_code == 200
        pending = 'halflabel_labelling_tasks{state="pending"} '
        deadline = time.monotonic() + 15  # the queue metrics are refreshed every 5 s
        while pending not in (text := http.get("/metrics").text) or f"{pending}0.0" in text:
            assert time.monotonic() < deadline, "the queue metrics never showed the queued input"
            time.sleep(0.2)
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    ok = 'halflabel_requests_total{app_name="halflabel",method="POST",path="/v1/predict",' \
         'status_code="200"}'
    assert float(samples[ok]) >= 1
    assert float(samples['halflabel_model_version{model="tiny"}']) == 1
    assert float(samples['halflabel_low_confidence_predictions_total{model="tiny"}']) >= 1
    assert float(samples['halflabel_batch_size_count{model="tiny"}']) >= 1
    assert float(samples["halflabel_inference_queue_depth"]) == 0  # every input was answered
    assert float(samples['halflabel_labelling_tasks{state="pending"}']) >= 1
    for histogram in ("queue_wait_seconds", "inference_seconds", "prediction_normalized_entropy"):
        assert float(samples[f'halflabel_{histogram}_count{{model="tiny"}}']) >= 1
