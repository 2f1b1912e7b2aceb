"""Open Inference Protocol v2 infer bodies: JSON, or JSON followed by binary tensor data.

The binary tensor data extension (Triton's and KServe's, what `tritonclient` sends by default):
the `Inference-Header-Content-Length` header says how many bytes of the body are the JSON
header; each input with `parameters.binary_data_size` has its little-endian, row-major bytes
after it, in input order. Outputs asked for with `parameters.binary_data` (or all of them with
the request parameter `binary_data_output`) come back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
from litestar import Response
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from pydantic import BaseModel, Field, ValidationError

from service.errors import BadInputError
from service.tensors import DTYPES, check_shape

HEADER_LENGTH = "Inference-Header-Content-Length"
Datatype = Literal["FP32", "UINT8"]


class _Parameters(BaseModel):
    """The binary extension's parameters of inputs, outputs and the request; others ignored."""

    binary_data_size: int | None = Field(default=None, ge=0)
    binary_data: bool | None = None
    binary_data_output: bool = False


class InferInput(BaseModel):
    name: str
    shape: list[int] = Field(min_length=1)
    datatype: Datatype
    data: list[Any] | None = Field(default=None, description="Flat or nested, row-major")
    parameters: _Parameters = _Parameters()


class RequestedOutput(BaseModel):
    name: str
    parameters: _Parameters = _Parameters()


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: _Parameters = _Parameters()


@dataclass
class InferOperation(Operation):
    """Documents the infer body's two forms, which the handler reads itself."""

    def __post_init__(self) -> None:
        request = Schema(
            type=OpenAPIType.OBJECT,
            required=["inputs"],
            description="An Open Inference Protocol v2 inference request (see docs/api.md)",
        )
        binary = Schema(
            type=OpenAPIType.STRING,
            format=OpenAPIFormat.BINARY,
            description=f"The JSON request ({HEADER_LENGTH} bytes), then binary tensor data",
        )
        self.request_body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(schema=request),
                "application/octet-stream": OpenAPIMediaType(schema=binary),
            },
        )


def read_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[np.ndarray]]:
    """The request and each input's values, shaped as the request says; 400 when they do not fit."""
    json_length = _header_length(header_length, len(body))
    try:
        request = InferRequest.model_validate_json(body[:json_length])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise BadInputError(f"bad infer request at {where}: {first['msg']}") from None
    binary = memoryview(body)[json_length:]
    declared = sum(tensor.parameters.binary_data_size or 0 for tensor in request.inputs)
    if declared != len(binary):
        raise BadInputError(
            f"the body has {len(binary)} bytes of binary tensor data, the inputs' "
            f"binary_data_size say {declared}; set {HEADER_LENGTH} to the JSON header's length"
        )
    values, offset = [], 0
    for tensor in request.inputs:
        size = tensor.parameters.binary_data_size
        if size is None:
            values.append(_json_values(tensor))
        else:
            values.append(_binary_values(tensor, binary[offset : offset + size]))
            offset += size
    return request, values


def _header_length(header: str | None, body_length: int) -> int:
    if header is None:
        return body_length
    if not header.isdigit() or not 0 < int(header) <= body_length:
        raise BadInputError(
            f"{HEADER_LENGTH} is {header!r}; it must be the JSON header's length in bytes, "
            f"at most the body's {body_length}"
        )
    return int(header)


def _json_values(tensor: InferInput) -> np.ndarray:
    count = check_shape(tensor.shape)
    if tensor.data is None:
        raise BadInputError(f"input {tensor.name!r} has neither 'data' nor binary_data_size")
    try:
        with np.errstate(over="ignore"):  # 1e39 becomes inf here and is refused as non-finite
            values = np.asarray(tensor.data, dtype=DTYPES[tensor.datatype])
    except (ValueError, TypeError, OverflowError):
        raise BadInputError(
            f"input {tensor.name!r} data are not all {tensor.datatype} numbers in nested lists "
            "of equal length"
        ) from None
    return _shaped(values.ravel(), count, tensor)


def _binary_values(tensor: InferInput, data: memoryview) -> np.ndarray:
    count = check_shape(tensor.shape)
    dtype = DTYPES[tensor.datatype]
    if len(data) % dtype.itemsize:
        raise BadInputError(
            f"input {tensor.name!r} has {len(data)} bytes, not a whole number of "
            f"{tensor.datatype} values"
        )
    return _shaped(np.frombuffer(data, dtype), count, tensor)


def _shaped(values: np.ndarray, count: int, tensor: InferInput) -> np.ndarray:
    if values.size != count:
        raise BadInputError(
            f"input {tensor.name!r} has {values.size} values; its shape {tensor.shape} "
            f"needs {count}"
        )
    return values.reshape(tensor.shape)


def wants_binary(request: InferRequest, output: RequestedOutput | None) -> bool:
    """Whether an output goes back as binary data: its own parameter, else the request's."""
    own = output.parameters.binary_data if output is not None else None
    return request.parameters.binary_data_output if own is None else own


def encode_response(
    head: dict[str, str], outputs: list[tuple[str, np.ndarray, bool]]
) -> Response[bytes]:
    """`head` (model name, version, id) and each FP32 output (name, values, as binary?)."""
    tensors: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for name, values, binary in outputs:
        tensor = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if binary:
            chunk = values.astype("<f4").tobytes()
            tensors.append({**tensor, "parameters": {"binary_data_size": len(chunk)}})
            chunks.append(chunk)
        else:
            tensors.append({**tensor, "data": values.ravel().tolist()})
    header = msgspec.json.encode({**head, "outputs": tensors})
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
