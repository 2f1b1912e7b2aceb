"""Open Inference Protocol v2 (KServe / Triton) routes, so existing clients work unchanged."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
from litestar import Response, Router, get, post
from litestar.datastructures import State
from litestar.exceptions import ClientException
from pydantic import BaseModel, Field

from models.preprocessing import uint8_to_array
from service.model_host import ModelHost, ServedModel
from service.predictor import Predictor
from service.security import requires_scope

SERVER_VERSION = "1"


class InferInput(BaseModel):
    """An input tensor: FP32 = preprocessed (N, C, H, W); UINT8 = raw pixels (N, H, W[, C])."""

    name: str
    shape: list[int] = Field(min_length=1)
    datatype: Literal["FP32", "UINT8"]
    data: list[Any] = Field(description="Values, flat or nested, in row-major order")


class RequestedOutput(BaseModel):
    name: str


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"] = "FP32"
    data: list[float]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


@get("/")
async def server_metadata() -> dict[str, object]:
    """OIP server metadata."""
    return {"name": "halflabel", "version": SERVER_VERSION, "extensions": []}


@get("/health/live")
async def live() -> dict[str, bool]:
    """The process is up."""
    return {"live": True}


@get("/health/ready")
async def ready(state: State) -> Response[dict[str, object]]:
    """A model is loaded and warm (503 until then)."""
    host: ModelHost = state.model_host
    return Response({"ready": host.ready}, status_code=200 if host.ready else 503)


@get("/models/{name:str}")
async def model_metadata(state: State, name: str) -> dict[str, object]:
    """Inputs, outputs, versions and the execution provider of the served model."""
    served = state.model_host.serving(name)
    manifest, engine = served.manifest, served.engine
    spec = manifest.input
    classes = len(manifest.classes)
    return {
        "name": manifest.name,
        "versions": [str(manifest.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": spec.input_name, "datatype": "FP32",
             "shape": [-1, spec.channels, spec.height, spec.width]},
        ],
        "outputs": [
            {"name": manifest.outputs.probabilities, "datatype": "FP32", "shape": [-1, classes]},
            {"name": manifest.outputs.entropy, "datatype": "FP32", "shape": [-1]},
        ],
        "parameters": {
            "execution_provider": engine.provider,
            "precision": engine.precision,
            "classes": list(manifest.classes),
            "entropy_threshold": manifest.entropy_threshold,
        },
    }


@get("/models/{name:str}/ready")
async def model_ready(state: State, name: str) -> dict[str, object]:
    """Whether `name` is loaded and warm (404 when it is not served here)."""
    state.model_host.serving(name)
    return {"name": name, "ready": True}


@post("/models/{name:str}/infer", status_code=200, guards=[requires_scope("predict")])
async def infer(state: State, name: str, data: InferRequest) -> InferResponse:
    """Run the served model on one input tensor (batched with concurrent requests)."""
    predictor: Predictor = state.predictor

    async def infer_with(served: ServedModel) -> InferResponse:
        names = served.manifest.outputs
        available = (names.probabilities, names.entropy)
        wanted = [output.name for output in data.outputs or []] or list(available)
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            choices = " or ".join(available)
            raise ClientException(f"unknown output {unknown[0]!r}: ask for {choices}")
        arrays = await asyncio.to_thread(_input_arrays, data.inputs[0], served)
        rows = await served.batcher.infer(arrays)
        values = {
            names.probabilities: np.stack([probabilities for probabilities, _ in rows]),
            names.entropy: np.asarray([entropy for _, entropy in rows], np.float32),
        }
        return InferResponse(
            model_name=served.manifest.name,
            model_version=str(served.manifest.version),
            id=data.id,
            outputs=[_output(output, values[output]) for output in wanted],
        )

    return await predictor.with_served(name, None, infer_with)


def _input_arrays(tensor: InferInput, served: ServedModel) -> list[np.ndarray]:
    spec = served.manifest.input
    dtype = np.float32 if tensor.datatype == "FP32" else np.uint8
    try:
        values = np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
    except (ValueError, TypeError, OverflowError):
        raise ClientException(
            f"input data does not fill shape {tensor.shape} with {tensor.datatype} values"
        ) from None
    if tensor.datatype == "UINT8":
        if values.ndim == 4 and values.shape[3] == 1:
            values = values[..., 0]
        if values.ndim not in (3, 4) or (values.ndim == 4 and values.shape[3] not in (3, 4)):
            raise ClientException("UINT8 input must be pixels shaped [N, H, W] or [N, H, W, C]")
        return [uint8_to_array(pixels, spec) for pixels in values]
    expected = [spec.channels, spec.height, spec.width]
    if values.ndim != 4 or list(values.shape[1:]) != expected:
        raise ClientException(f"FP32 input must be shaped [N, {', '.join(map(str, expected))}]")
    return list(values)


def _output(name: str, values: np.ndarray) -> InferOutput:
    return InferOutput(name=name, shape=list(values.shape), data=values.ravel().tolist())


v2_router = Router(
    "/v2", route_handlers=[server_metadata, live, ready, model_ready, model_metadata, infer]
)
