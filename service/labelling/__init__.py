"""Labelling over HTTP (scope `label`) and the `/label` page.

Routes under `/v1/labelling`: the queue's tasks (`tasks`: claim under a lease, image, label,
release, stats) and exports and imports (`exports`: an image folder, Label Studio's format from
`label_studio`). `metrics` reports the queue to Prometheus; `page` serves the page.

The routes use the app state's `labelling_queue`, the service's one synchronous Redis client;
`service.app` opens it, with the lease of `HALFLABEL_LABEL_LEASE_SECONDS`, and closes it.
"""

from __future__ import annotations

from http import HTTPStatus

import redis
from litestar import Request, Response, Router
from litestar.datastructures import State
from litestar.di import Provide

from models.queue import LabellingQueue
from service.labelling.exports import EXPORT_ROUTES
from service.labelling.metrics import QueueMetrics
from service.labelling.page import PAGE_ROUTES
from service.labelling.tasks import TASK_ROUTES
from service.problems import problem
from service.security import requires_scope

__all__ = ["QueueMetrics", "labelling_router"]


def _queue(state: State) -> LabellingQueue:
    return state.labelling_queue  # type: ignore[no-any-return]


def _redis_unavailable(_: Request, exc: redis.RedisError) -> Response[dict[str, object]]:
    return problem(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"the labelling queue's Redis is unavailable ({type(exc).__name__}); "
        "check that it runs and HALFLABEL_REDIS_URL points at it, then retry",
        {"Retry-After": "5"},
    )


def _nested_too_deep(_: Request, __: RecursionError) -> Response[dict[str, object]]:
    # The JSON decoder gives up on deep nesting with RecursionError; that is the client's body.
    return problem(HTTPStatus.BAD_REQUEST, "the JSON body is nested too deeply to read")


_api = Router(
    "/v1/labelling",
    route_handlers=[*TASK_ROUTES, *EXPORT_ROUTES],
    guards=[requires_scope("label")],
    dependencies={"queue": Provide(_queue, sync_to_thread=False)},
    exception_handlers={redis.RedisError: _redis_unavailable, RecursionError: _nested_too_deep},
)

labelling_router = Router("/", route_handlers=[_api, *PAGE_ROUTES])
