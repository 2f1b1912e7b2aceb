"""The engine: dynamic batching, back-pressure, timeouts, and version swaps while serving."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    TINY_SPEC,
    LiveService,
    grey_png,
    start_service,
    stop_service,
    tiny_draft,
    tiny_env,
    tiny_onnx_model,
)
from PIL import Image

from models.repository import MODEL_FILE, ModelRepository
from service.batching import DynamicBatcher
from service.engine import DeviceUnavailableError, OnnxModel, Outputs

PNG = {"Content-Type": "image/png"}


def test_concurrent_inputs_are_batched_and_each_gets_its_own_answer(
    model_repo: ModelRepository,
) -> None:
    model = OnnxModel(model_repo.resolve("tiny"), device="cpu", intra_op_threads=1)
    batch_sizes: list[int] = []

    def recording_run(batch: np.ndarray) -> Outputs:
        batch_sizes.append(len(batch))
        return model.run(batch)

    levels = np.linspace(-2, 2, 10, dtype=np.float32)
    inputs = [np.full((1, 4, 4), level, np.float32) for level in levels]

    async def scenario() -> list[tuple[np.ndarray, float]]:
        batcher = DynamicBatcher(
            recording_run, ThreadPoolExecutor(1), "tiny", max_batch_size=4, max_queue_delay_s=0.2,
            max_queue_size=100,
        )
        batcher.start()
        answers = await asyncio.gather(*(batcher.infer([array]) for array in inputs))
        await batcher.close()
        return [answer for [answer] in answers]

    answers = asyncio.run(scenario())
    assert batch_sizes == [4, 4, 2]
    alone = model.run(np.stack(inputs))
    for i, (probabilities, entropy) in enumerate(answers):
        np.testing.assert_allclose(probabilities, alone.probabilities[i], rtol=1e-6)
        assert entropy == pytest.approx(float(alone.entropy[i]), rel=1e-5)


def test_full_queue_answers_503_with_retry_after(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    # A lone input waits up to 1 s for its batch to fill, holding one of the two queue places.
    env = tiny_env(model_repo, queue_prefix, max_queue_size="2", max_batch_size="8",
                   max_queue_delay_ms="1000")
    service = start_service(env, tmp_path / "service.log")
    two, three = ([("file", (f"{i}.png", grey_png(0), "image/png")) for i in range(n)]
                  for n in (2, 3))
    try:
        with service.client() as http, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(http.post, "/v1/predict", content=grey_png(0), headers=PNG)
            time.sleep(0.5)
            busy = http.post("/v1/predict", files=two)
            too_many = http.post("/v1/predict", files=three)
            assert waiting.result().status_code == 200
            later = http.post("/v1/predict", files=two)
    finally:
        stop_service(service)
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == "1"
    assert busy.headers["content-type"] == "application/problem+json"
    assert too_many.status_code == 413 and "send fewer" in too_many.json()["detail"]
    assert later.status_code == 200


def test_a_full_queue_refuses_before_reading_the_body(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, queue_prefix, max_queue_size="1", max_batch_size="8",
                   max_queue_delay_ms="2000")
    service = start_service(env, tmp_path / "service.log")
    host, port = service.url.removeprefix("http://").split(":")
    answers = []
    try:
        with service.client() as http, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(http.post, "/v1/predict", content=grey_png(0), headers=PNG)
            time.sleep(0.5)  # it holds the queue's one place for 2 s
            for path in ("/v1/predict", "/v2/models/tiny/infer"):
                with socket.create_connection((host, int(port)), timeout=1.5) as raw:
                    # Headers announcing a body that never comes: only admission can answer.
                    raw.sendall(raw_post(path, "image/png", b"", length=100_000))
                    answers.append(raw.recv(4096).decode())
            assert waiting.result().status_code == 200
    finally:
        stop_service(service)
    for answer in answers:
        assert answer.startswith("HTTP/1.1 503"), answer
        assert "retry-after: 1" in answer.lower()


def test_inputs_of_a_client_that_left_are_never_run(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    # A lone input waits 1.5 s for its batch; its client leaves after 0.3 s.
    env = tiny_env(model_repo, queue_prefix, max_batch_size="8", max_queue_delay_ms="1500")
    service = start_service(env, tmp_path / "service.log")
    host, port = service.url.removeprefix("http://").split(":")
    tensor = json.dumps({"inputs": [
        {"name": "image", "shape": [1, 4, 4], "datatype": "UINT8", "data": [0] * 16}
    ]}).encode()
    requests = [raw_post("/v1/predict", "image/png", grey_png(0)),
                raw_post("/v2/models/tiny/infer", "application/json", tensor)]
    try:
        for request in requests:
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(request)
                time.sleep(0.3)
        time.sleep(2)  # past the batch delay: had the inputs stayed queued, they would have run
        with service.client() as http:
            metrics = http.get("/metrics").text
    finally:
        stop_service(service)
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if line and not line.startswith("#"))
    assert 'halflabel_predictions_total{model="tiny"}' not in samples
    assert float(samples.get('halflabel_batch_size_count{model="tiny"}', 0)) == 0
    for template in ("/v1/predict", "/v2/models/{name}/infer"):
        gone = ('halflabel_requests_total{app_name="halflabel",method="POST",'
                f'path="{template}",status_code="499"}}')
        assert float(samples[gone]) == 1
    assert float(samples["halflabel_inference_queue_depth"]) == 0


def raw_post(path: str, content_type: str, body: bytes, length: int | None = None) -> bytes:
    """An HTTP/1.1 POST as bytes, for sockets; `length` may announce more body than is sent."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    return head.encode() + body


def test_decoding_beyond_the_pixels_in_flight_is_refused_at_once(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    # A 9000x9000 image takes about a second to decode; a small one sent meanwhile is refused.
    env = tiny_env(model_repo, queue_prefix, max_pixels="100000000",
                   max_pixels_in_flight="1000000")
    service = start_service(env, tmp_path / "service.log")
    big = io.BytesIO()
    Image.new("L", (9000, 9000), 0).save(big, format="PNG")
    refused = []
    try:
        with service.client() as http, ThreadPoolExecutor(1) as pool:
            # The big image is itself refused when it arrives while a small one decodes: resend.
            def big_decode_while_probing() -> Future[httpx.Response]:
                decoding = pool.submit(
                    http.post, "/v1/predict", content=big.getvalue(), headers=PNG
                )
                while not decoding.done() and not refused:
                    response = http.post("/v1/predict", content=grey_png(0), headers=PNG)
                    if response.status_code == 503:
                        refused.append(response)
                return decoding

            decoding, resent = big_decode_while_probing(), 0
            while decoding.result().status_code == 503 and resent < 5:
                decoding, resent = big_decode_while_probing(), resent + 1
            assert decoding.result().status_code == 200
            after = http.post("/v1/predict", content=grey_png(0), headers=PNG)
            metrics = http.get("/metrics").text
    finally:
        stop_service(service)
    [busy] = refused
    assert busy.headers["retry-after"] == "1"
    assert "HALFLABEL_MAX_PIXELS_IN_FLIGHT" in busy.json()["detail"]
    assert after.status_code == 200
    # The small one refused, and the big one each time it had to be resent.
    assert f"halflabel_decodes_refused_total {1 + resent}.0" in metrics


def test_slow_request_times_out_with_504(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    service = start_service(tiny_env(model_repo, queue_prefix, request_timeout_s="0.000001"),
                            tmp_path / "service.log")
    try:
        with service.client() as http:
            response = http.post("/v1/predict", content=grey_png(0), headers=PNG)
    finally:
        stop_service(service)
    assert response.status_code == 504, response.text
    assert "HALFLABEL_REQUEST_TIMEOUT_S" in response.json()["detail"]


def publish_tampered(repo: ModelRepository, tmp_path: Path) -> int:
    """Place a next version whose ONNX file no longer matches its manifest, atomically."""
    scratch = ModelRepository(tmp_path / "scratch")
    artifact = scratch.publish("tiny", tiny_onnx_model(tmp_path / "t.onnx"), tiny_draft())
    with (artifact.path / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    version = max(repo.versions("tiny")) + 1
    shutil.move(artifact.path, repo.root / "tiny" / str(version))
    return version


def versions_answering(service: LiveService, stop: threading.Event, seen: list[int]) -> None:
    with service.client() as http:
        while not stop.is_set():
            response = http.post("/v1/predict", content=grey_png(0), headers=PNG)
            seen.append(response.json()["version"] if response.status_code == 200 else -1)


def test_new_version_swaps_in_without_failing_requests_and_broken_ones_are_refused(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    service = start_service(tiny_env(model_repo, queue_prefix, poll_interval_s="0.1"),
                            tmp_path / "service.log")
    stop, seen = threading.Event(), []
    load = threading.Thread(target=versions_answering, args=(service, stop, seen))
    try:
        load.start()
        time.sleep(0.3)
        model_repo.publish("tiny", tiny_onnx_model(tmp_path / "v2.onnx"), tiny_draft())
        deadline = time.monotonic() + 20
        while 2 not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        tampered = publish_tampered(model_repo, tmp_path)
        time.sleep(1.0)  # ten polls
        # Verifies, but its graph takes 4x4 images while its manifest promises 8x8.
        wrong_spec = tiny_draft().model_copy(update={"input": TINY_SPEC.model_copy(
            update={"height": 8, "width": 8})})
        broken = model_repo.publish("tiny", tiny_onnx_model(tmp_path / "v4.onnx"), wrong_spec)
        time.sleep(1.0)
        stop.set()
        load.join()
        with service.client() as http:
            after = http.post("/v1/predict", content=grey_png(0), headers=PNG).json()["version"]
            metrics = http.get("/metrics").text
    finally:
        stop.set()
        stop_service(service)
    assert -1 not in seen, "a request failed during the swap"
    assert seen[0] == 1 and 2 in seen
    assert seen == sorted(seen), "an old version answered after the new one"
    assert after == 2
    assert 'halflabel_model_load_failures_total{model="tiny"} 2.0' in metrics
    log = service.log.read_text()
    assert f"refused version {tampered}" in log and "sha256" in log
    assert f"refused version {broken.manifest.version}" in log and "warm-up" in log


def test_tampered_model_at_start_exits_with_one_clear_line(model_repo: ModelRepository) -> None:
    with (model_repo.root / "tiny" / "1" / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0"],
        env={"HALFLABEL_MODEL_DIR": str(model_repo.root), "HALFLABEL_MODEL_NAME": "tiny",
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sha256" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_without_a_gpu_the_cpu_serves_the_fp32_file_and_cuda_is_one_clear_error(
    model_repo: ModelRepository, tmp_path: Path
) -> None:
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    onnx_file = tiny_onnx_model(tmp_path / "tiny.onnx")
    artifact = model_repo.publish("tiny", onnx_file, tiny_draft(), fp16_onnx_file=onnx_file)
    with pytest.raises(DeviceUnavailableError, match="HALFLABEL_DEVICE=auto"):
        OnnxModel(artifact, device="cuda")
    model = OnnxModel(artifact, device="auto")
    assert (model.provider, model.precision) == ("CPUExecutionProvider", "fp32")
    assert model.path == artifact.onnx_path


def test_pinned_version_stays_when_newer_ones_are_published(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    model_repo.publish("tiny", tiny_onnx_model(tmp_path / "v2.onnx"), tiny_draft())
    env = tiny_env(model_repo, queue_prefix, model_version="1", poll_interval_s="0.1")
    service = start_service(env, tmp_path / "service.log")
    try:
        model_repo.publish("tiny", tiny_onnx_model(tmp_path / "v3.onnx"), tiny_draft())
        time.sleep(1.0)  # ten polls, had it been polling
        with service.client() as http:
            pinned = http.post("/v1/predict", content=grey_png(0), headers=PNG,
                               params={"version": 1})
            newer = http.post("/v1/predict", content=grey_png(0), headers=PNG,
                              params={"version": 3})
    finally:
        stop_service(service)
    assert pinned.status_code == 200 and pinned.json()["version"] == 1
    assert newer.status_code == 404 and "HALFLABEL_MODEL_VERSION" in newer.json()["detail"]


def test_concurrent_http_requests_share_batches_and_get_their_own_answers(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, queue_prefix, max_queue_delay_ms="300", max_batch_size="8")
    service = start_service(env, tmp_path / "service.log")
    levels = [0, 255] * 4

    def predict(level: int) -> str:
        with service.client() as http:
            response = http.post("/v1/predict", content=grey_png(level), headers=PNG)
            return str(response.json()["predictions"][0]["label"])

    try:
        with ThreadPoolExecutor(len(levels)) as pool:
            labels = list(pool.map(predict, levels))
        with service.client() as http:
            metrics = http.get("/metrics").text
    finally:
        stop_service(service)
    assert labels == ["dark", "light"] * 4
    sizes = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("halflabel_batch_size_")}
    assert sizes['halflabel_batch_size_sum{model="tiny"}'] == len(levels)
    count = sizes['halflabel_batch_size_count{model="tiny"}']
    assert count < len(levels), "no two requests shared a batch"
