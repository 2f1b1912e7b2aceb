"""Open Inference Protocol v2 (KServe / Triton) routes, so existing clients work unchanged.

Every model route also answers under `/versions/{version}`; a version that is not the served
one is a 404. Inference goes through the same predict path as /v1 (batching, metrics, the
labelling queue); the request and answer bodies are in `service.oip_body`.
"""

from __future__ import annotations

import asyncio

import numpy as np
from litestar import Request, Response, Router, get, post
from litestar.datastructures import State

from models.errors import ModelNotFoundError
from models.manifest import Manifest
from service.disconnect import unless_client_leaves
from service.errors import BadInputError, UnsupportedMediaTypeError
from service.model_host import ModelHost, ServedModel
from service.oip_body import (
    HEADER_LENGTH,
    InferOperation,
    InferRequest,
    RequestedOutput,
    encode_response,
    read_request,
    wants_binary,
)
from service.predictor import Inference, ModelInput, Predictor
from service.security import requires_scope
from service.tensors import model_inputs

SERVER_VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]


def _paths(suffix: str = "") -> list[str]:
    model = "/models/{name:str}"
    return [f"{model}{suffix}", f"{model}/versions/{{version:str}}{suffix}"]


def _version(name: str, version: str | None) -> int | None:
    """A route's version segment as a number; ModelNotFoundError when it is not one."""
    if version is None:
        return None
    if not version.isdigit():
        raise ModelNotFoundError(
            f"version {version!r} of {name!r} is not served; versions are integers"
        )
    return int(version)


def _served(state: State, name: str, version: str | None) -> ServedModel:
    """The served model if it is `name` at `version` (when given), else ModelNotFoundError."""
    host: ModelHost = state.model_host
    return host.serving(name, _version(name, version))


@get("/")
async def server_metadata() -> dict[str, object]:
    """OIP server metadata, with the protocol extensions this server implements."""
    return {"name": "halflabel", "version": SERVER_VERSION, "extensions": EXTENSIONS}


@get("/health/live")
async def live() -> dict[str, bool]:
    """The process is up."""
    return {"live": True}


@get("/health/ready")
async def ready(state: State) -> Response[dict[str, object]]:
    """A model is loaded and warm (503 until then)."""
    host: ModelHost = state.model_host
    return Response({"ready": host.ready}, status_code=200 if host.ready else 503)


@get(_paths())
async def model_metadata(state: State, name: str, version: str | None = None) -> dict[str, object]:
    """Inputs, outputs, versions and the execution provider of the served model."""
    served = _served(state, name, version)
    manifest, engine = served.manifest, served.engine
    spec = manifest.input
    preprocessed = {
        "name": spec.input_name,
        "datatype": "FP32",
        "shape": [-1, spec.channels, spec.height, spec.width],
    }
    pixels = [
        {"name": spec.input_name, "datatype": "UINT8", "shape": shape}
        for shape in ([-1, -1, -1], [-1, -1, -1, -1])
    ]
    return {
        "name": manifest.name,
        "versions": [str(manifest.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [preprocessed],
        "outputs": [
            {"name": manifest.outputs.probabilities, "datatype": "FP32",
             "shape": [-1, len(manifest.classes)]},
            {"name": manifest.outputs.entropy, "datatype": "FP32", "shape": [-1]},
        ],
        "parameters": {
            "execution_provider": engine.provider,
            "precision": engine.precision,
            "classes": list(manifest.classes),
            "entropy_threshold": manifest.entropy_threshold,
            # OIP metadata has one datatype per input; raw pixels of any size are taken too.
            "accepted_inputs": [preprocessed, *pixels],
        },
    }


@get(_paths("/ready"))
async def model_ready(state: State, name: str, version: str | None = None) -> dict[str, object]:
    """Whether `name` (at `version`) is loaded and warm (404 when it is not served here)."""
    _served(state, name, version)
    return {"name": name, "ready": True}


@post(
    _paths("/infer"),
    status_code=200,
    guards=[requires_scope("predict")],
    operation_class=InferOperation,
)
async def infer(
    request: Request, state: State, name: str, version: str | None = None
) -> Response[bytes]:
    """Run the served model on one input tensor (batched with concurrent requests)."""
    predictor: Predictor = state.predictor
    number = _version(name, version)
    predictor.admit(name, number)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {request.headers['content-encoding']!r} is not supported; "
            "send the body uncompressed"
        )
    body = await request.body()
    infer_request, [values] = await asyncio.to_thread(
        read_request, body, request.headers.get(HEADER_LENGTH)
    )
    [tensor] = infer_request.inputs

    def prepare(served: ServedModel) -> list[ModelInput]:
        spec = served.manifest.input
        if tensor.name != spec.input_name:
            raise BadInputError(
                f"unknown input {tensor.name!r}: this model's input is {spec.input_name!r}"
            )
        _wanted(infer_request, served.manifest)
        with predictor.pixels.reserve(values.size):
            return model_inputs(values, tensor.datatype, spec)

    inference = await unless_client_leaves(request, predictor.infer(name, number, prepare))
    return _answer(infer_request, inference)


def _answer(request: InferRequest, inference: Inference) -> Response[bytes]:
    manifest, scored = inference.manifest, inference.scored
    outputs = {
        manifest.outputs.probabilities: np.stack([one.probabilities for one in scored]),
        manifest.outputs.entropy: np.asarray([one.entropy for one in scored], np.float32),
    }
    head = {"model_name": manifest.name, "model_version": str(manifest.version)}
    if request.id is not None:
        head["id"] = request.id
    return encode_response(
        head,
        [
            (output_name, outputs[output_name], wants_binary(request, requested))
            for output_name, requested in _wanted(request, manifest)
        ],
    )


def _wanted(request: InferRequest, manifest: Manifest) -> list[tuple[str, RequestedOutput | None]]:
    """The outputs to answer with (all when none are asked for); 400 for an unknown one."""
    available = (manifest.outputs.probabilities, manifest.outputs.entropy)
    if not request.outputs:
        return [(output_name, None) for output_name in available]
    for output in request.outputs:
        if output.name not in available:
            choices = " or ".join(repr(output_name) for output_name in available)
            raise BadInputError(f"unknown output {output.name!r}: ask for {choices}")
    return [(output.name, output) for output in request.outputs]


v2_router = Router(
    "/v2", route_handlers=[server_metadata, live, ready, model_ready, model_metadata, infer]
)
