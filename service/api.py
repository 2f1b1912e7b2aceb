"""The `/v1` prediction routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from litestar import Request, Router, post
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import Parameter

from service.disconnect import unless_client_leaves
from service.inputs import IMAGE_TYPES, read_images
from service.schemas import PredictResponse
from service.security import requires_scope

TopK = Annotated[int | None, Parameter(ge=1, description="How many class probabilities to return")]
Version = Annotated[
    int | None, Parameter(ge=1, description="Answer only with this model version (404 otherwise)")
]


_FILE = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
_INSTANCES = Schema(
    type=OpenAPIType.OBJECT,
    required=["instances"],
    properties={
        "instances": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(
                type=OpenAPIType.OBJECT,
                required=["b64"],
                properties={"b64": Schema(type=OpenAPIType.STRING, content_encoding="base64")},
            ),
        )
    },
)
_MULTIPART = Schema(
    type=OpenAPIType.OBJECT, properties={"file": Schema(type=OpenAPIType.ARRAY, items=_FILE)}
)


@dataclass
class PredictOperation(Operation):
    """Documents the three body forms, which the handlers read themselves."""

    def __post_init__(self) -> None:
        content = {media_type: OpenAPIMediaType(schema=_FILE) for media_type in IMAGE_TYPES}
        content[MediaType.JSON] = OpenAPIMediaType(schema=_INSTANCES)
        content["multipart/form-data"] = OpenAPIMediaType(schema=_MULTIPART)
        self.request_body = RequestBody(content=content, required=True)


@post("/predict", status_code=200, operation_class=PredictOperation)
async def predict(
    request: Request, state: State, top_k: TopK = None, version: Version = None
) -> PredictResponse:
    """Predict the served model's class for one image (raw body) or several (multipart, JSON)."""
    name = state.settings.model_name
    state.predictor.admit(name, version)
    images = await read_images(request)
    return await unless_client_leaves(
        request, state.predictor.predict(name, images, top_k, version)
    )


@post("/models/{name:str}/predict", status_code=200, operation_class=PredictOperation)
async def predict_with(
    request: Request, state: State, name: str, top_k: TopK = None, version: Version = None
) -> PredictResponse:
    """Like /v1/predict, naming the model (404 when this service does not serve it)."""
    state.predictor.admit(name, version)
    images = await read_images(request)
    return await unless_client_leaves(
        request, state.predictor.predict(name, images, top_k, version)
    )


v1_router = Router(
    "/v1", route_handlers=[predict, predict_with], guards=[requires_scope("predict")]
)
