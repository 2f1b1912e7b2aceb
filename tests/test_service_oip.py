"""/v2 (Open Inference Protocol) through the real service: NVIDIA's own Triton HTTP client,
binary and JSON tensors, versioned routes, and the shared predict path (metrics, queue)."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
import redis
import tritonclient.http as triton
from conftest import REDIS_URL, TINY_SPEC, LiveService
from PIL import Image
from tritonclient.utils import InferenceServerException

from models.preprocessing import preprocess
from models.queue import LabellingQueue, QueueKeys

PIXELS = np.random.default_rng(0).integers(90, 170, (8, 8), dtype=np.uint8)  # uncertain, 8x8


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def v1_probabilities(service: LiveService, image: bytes) -> list[float]:
    with service.client() as http:
        response = http.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    by_label = {p["label"]: p["probability"] for p in prediction["probabilities"]}
    return [by_label["dark"], by_label["light"]]


@pytest.fixture(scope="module")
def client(shared_service: LiveService) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(shared_service.url.removeprefix("http://"))


def test_triton_client_sees_a_live_ready_server_and_versioned_model(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("tiny", "latest")
    metadata = client.get_model_metadata("tiny", "1")
    assert metadata["versions"] == ["1"]
    accepted = {(t["datatype"], len(t["shape"])) for t in metadata["parameters"]["accepted_inputs"]}
    assert accepted == {("FP32", 4), ("UINT8", 3), ("UINT8", 4)}
    with pytest.raises(InferenceServerException, match="version 2 of 'tiny' is not served"):
        client.get_model_metadata("tiny", "2")


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_triton_client_infers_as_v1_predicts_the_same_image(
    shared_service: LiveService,
    client: triton.InferenceServerClient,
    binary_in: bool,
    binary_out: bool,
) -> None:
    expected = v1_probabilities(shared_service, png(PIXELS))
    pixels = triton.InferInput("image", [1, 8, 8], "UINT8")
    pixels.set_data_from_numpy(PIXELS[None], binary_data=binary_in)
    preprocessed = triton.InferInput("image", [1, 1, 4, 4], "FP32")
    preprocessed.set_data_from_numpy(preprocess(png(PIXELS), TINY_SPEC)[None],
                                     binary_data=binary_in)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary_out)
               for name in ("probabilities", "entropy")]
    for tensor in (pixels, preprocessed):
        result = client.infer("tiny", [tensor], model_version="1", outputs=outputs,
                              request_id="r7")
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], expected, rtol=1e-6)
        assert result.as_numpy("entropy").shape == (1,)
        response = result.get_response()
        assert response["id"] == "r7" and response["model_version"] == "1"
    default = client.infer("tiny", [pixels])  # no outputs named: all of them, binary
    np.testing.assert_allclose(default.as_numpy("probabilities")[0], expected, rtol=1e-6)
    assert "id" not in default.get_response()


def test_triton_client_shows_our_errors(client: triton.InferenceServerClient) -> None:
    wrong_name = triton.InferInput("pixels", [1, 4, 4], "UINT8")
    wrong_name.set_data_from_numpy(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(InferenceServerException, match="this model's input is 'image'") as info:
        client.infer("tiny", [wrong_name])
    assert info.value.status() == "400"
    non_finite = triton.InferInput("image", [1, 1, 4, 4], "FP32")
    non_finite.set_data_from_numpy(np.full((1, 1, 4, 4), np.nan, np.float32))
    with pytest.raises(InferenceServerException, match="NaN, infinity"):
        client.infer("tiny", [non_finite])
    with pytest.raises(InferenceServerException, match="version 3 of 'tiny' is not served"):
        client.infer("tiny", [non_finite], model_version="3")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def test_v2_inference_is_counted_and_uncertain_tensors_are_queued_as_png(
    live_service: LiveService, queue_prefix: str
) -> None:
    grey = [(128 / 255 - 0.5) / 0.25] * 16  # pixel 128, normalised as TINY_SPEC says
    fp32 = {"name": "image", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": grey}
    uint8 = {"name": "image", "shape": [1, 8, 8], "datatype": "UINT8",
             "data": PIXELS.ravel().tolist()}
    with live_service.client() as http:
        for tensor in (fp32, uint8):
            response = http.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
            assert response.status_code == 200, response.text
        text = http.get("/metrics").text
    assert metric(text, 'halflabel_predictions_total{model="tiny"}') == 2
    assert metric(text, 'halflabel_low_confidence_predictions_total{model="tiny"}') == 2
    assert metric(text, 'halflabel_batch_size_count{model="tiny"}') >= 1
    ok = ('halflabel_requests_total{app_name="halflabel",method="POST",'
          'path="/v2/models/{name}/infer",status_code="200"}')
    assert metric(text, ok) == 2
    client = redis.Redis.from_url(REDIS_URL)
    queue = LabellingQueue(client, queue_prefix)
    for pixels in (np.full((4, 4), 128, np.uint8), PIXELS):
        image = png(pixels)
        task_id = hashlib.sha256(image).hexdigest()
        deadline = time.monotonic() + 5
        while not client.exists(QueueKeys(queue_prefix).task(task_id)):
            assert time.monotonic() < deadline, "the tensor's task never reached Redis"
            time.sleep(0.05)
        assert client.get(QueueKeys(queue_prefix).image(task_id)) == image
        task = queue.task(task_id)
        assert task is not None and task.record.content_type == "image/png"
        assert task.record.model_name == "tiny"
