"""Malformed and hostile requests get a clear 4xx, never a 500, through the real service."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import time

import httpx
import pytest
from conftest import LiveService, grey_png

V2_INFER = "/v2/models/tiny/infer"


def assert_v2_error(response: httpx.Response, status: int, phrase: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert phrase in response.json()["error"]


def tensor(shape: list[int], datatype: str = "FP32", data: object = None) -> dict[str, object]:
    return {"name": "image", "shape": shape, "datatype": datatype, "data": data or []}


def nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


def test_a_multipart_part_without_a_filename_is_a_400(shared_service: LiveService) -> None:
    binary = ("file", (None, grey_png(0), "image/png"))  # Litestar would read it as UTF-8 text
    text = ("file", (None, b"hello", "text/plain"))
    with shared_service.client() as http:
        for part in (binary, text):
            response = http.post("/v1/predict", files=[part])
            assert response.status_code == 400, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert "has no filename" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        (tensor([0, 1, 4, 4]), "empty or negative dimension"),
        (tensor([1, 0, 4], "UINT8"), "empty or negative dimension"),
        (tensor([1, 1, 0, 4]), "empty or negative dimension"),
        (tensor([1, 1, 4, 4], data=[1e39] * 16), "NaN, infinity"),
        (tensor([1, 1, 4, 4], data=[0.0] * 15), "needs 16"),
        (tensor([1, 4, 4], "UINT8", [[0] * 4] * 3 + [[0] * 3]), "equal length"),
        (tensor([1, 4, 4], "UINT8", [-1] * 16), "UINT8 numbers"),
        ({"inputs": [{**tensor([1, 4, 4], "UINT8", [0] * 16), "name": "pixels"}]},
         "this model's input is 'image'"),
    ],
)
def test_v2_tensors_that_do_not_fit_are_a_400_naming_the_problem(
    shared_service: LiveService, body: dict[str, object], phrase: str
) -> None:
    request = body if "inputs" in body else {"inputs": [body]}
    with shared_service.client() as http:
        assert_v2_error(http.post(V2_INFER, json=request), 400, phrase)


def post_binary(
    http: httpx.Client, values: bytes, size: int, header_length: str | None
) -> httpx.Response:
    header = json.dumps({"inputs": [{
        "name": "image", "shape": [1, 1, 4, 4], "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }]}).encode()
    length = str(len(header)) if header_length is None else header_length
    return http.post(V2_INFER, content=header + values,
                     headers={"Inference-Header-Content-Length": length})


@pytest.mark.parametrize(
    ("values", "size", "header_length", "phrase"),
    [
        (struct.pack("<16f", *[float("inf")] * 16), 64, None, "NaN, infinity"),
        (struct.pack("<16f", *[float("nan")] * 16), 64, None, "NaN, infinity"),
        (struct.pack("<15f", *[0.0] * 15), 60, None, "needs 16"),
        (struct.pack("<16f", *[0.0] * 16), 63, None, "binary_data_size say 63"),
        (struct.pack("<16f", *[0.0] * 16)[:63], 63, None, "not a whole number of FP32"),
        (struct.pack("<16f", *[0.0] * 16), 64, "999999", "must be the JSON header's length"),
        (struct.pack("<16f", *[0.0] * 16), 64, "-5", "must be the JSON header's length"),
    ],
    ids=["inf", "nan", "short", "size-mismatch", "partial-value", "long-header", "bad-header"],
)
def test_v2_binary_tensors_that_do_not_fit_are_a_400(
    shared_service: LiveService, values: bytes, size: int, header_length: str | None, phrase: str
) -> None:
    with shared_service.client() as http:
        response = post_binary(http, values, size, header_length)
    assert_v2_error(response, 400, phrase)


def test_a_compressed_v2_body_is_a_415(shared_service: LiveService) -> None:
    request = {"inputs": [tensor([1, 4, 4], "UINT8", [0] * 16)]}
    with shared_service.client() as http:
        response = http.post(V2_INFER, content=gzip.compress(json.dumps(request).encode()),
                             headers={"Content-Encoding": "gzip"})
    assert_v2_error(response, 415, "send the body uncompressed")


def test_json_nested_a_thousand_levels_is_a_400_on_v1_and_v2(shared_service: LiveService) -> None:
    deep_v2 = '{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": %s}]}'
    deep_v1 = '{"instances": %s}'
    json_type = {"Content-Type": "application/json"}
    with shared_service.client() as http:
        v2 = http.post(V2_INFER, content=deep_v2 % nested(1200), headers=json_type)
        v1 = http.post("/v1/predict", content=deep_v1 % nested(1200), headers=json_type)
    assert_v2_error(v2, 400, "bad infer request")
    assert v1.status_code == 400, v1.text
    assert v1.headers["content-type"] == "application/problem+json"


def requests_by_status(service: LiveService, path: str) -> dict[str, float]:
    with service.client() as http:
        text = http.get("/metrics").text
    prefix = f'halflabel_requests_total{{app_name="halflabel",method="POST",path="{path}"'
    return {
        line.split('status_code="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines() if line.startswith(prefix)
    }


def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(shared_service: LiveService) -> None:
    host, port = shared_service.url.removeprefix("http://").split(":")
    for path, template in (("/v1/predict", "/v1/predict"), (V2_INFER, "/v2/models/{name}/infer")):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        "Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
            time.sleep(0.2)  # the handler is reading the body now
        deadline = time.monotonic() + 5
        while "499" not in requests_by_status(shared_service, template):
            assert time.monotonic() < deadline, "the disconnect was never counted"
            time.sleep(0.1)
        statuses = requests_by_status(shared_service, template)
        assert statuses["499"] >= 1 and "500" not in statuses, statuses
