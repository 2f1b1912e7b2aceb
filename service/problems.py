"""Every error answer is `application/problem+json` (RFC 9457) with a one-line `detail`."""

from __future__ import annotations

import logging
from http import HTTPStatus

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from models.errors import HalflabelError, InvalidImageError, ModelNotFoundError
from service.batching import BatcherClosedError, ServerBusyError, TooManyInputsError
from service.predictor import RequestTimeoutError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = "1"

_STATUS_OF: dict[type[HalflabelError], HTTPStatus] = {
    ModelNotFoundError: HTTPStatus.NOT_FOUND,
    InvalidImageError: HTTPStatus.UNPROCESSABLE_ENTITY,
    ServerBusyError: HTTPStatus.SERVICE_UNAVAILABLE,
    TooManyInputsError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    BatcherClosedError: HTTPStatus.SERVICE_UNAVAILABLE,
    RequestTimeoutError: HTTPStatus.GATEWAY_TIMEOUT,
}


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None
) -> Response[dict[str, object]]:
    """A problem+json response."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    return Response(
        {**body, "detail": detail}, status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def _http_exception(request: Request, exc: HTTPException) -> Response[dict[str, object]]:
    return problem(exc.status_code, _explain(request, exc), exc.headers)


def _explain(request: Request, exc: HTTPException) -> str:
    """Litestar's own errors say only the status phrase; say what to do instead."""
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        return f"{exc.detail}: {first.get('key', '')} {first.get('message', '')}".strip()
    if exc.detail != HTTPStatus(exc.status_code).phrase:
        return exc.detail
    route = f"{request.method} {request.url.path}"
    if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        limit = request.app.state.settings.max_body_bytes
        return f"body over the {limit}-byte limit; send smaller images or fewer per request"
    if exc.status_code == HTTPStatus.NOT_FOUND:
        return f"no route {route}; the routes are listed at /schema"
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        return f"{route} is not allowed; the routes and their methods are listed at /schema"
    return exc.detail


def _halflabel_error(_: Request, exc: HalflabelError) -> Response[dict[str, object]]:
    status = next(
        (code for kind, code in _STATUS_OF.items() if isinstance(exc, kind)),
        HTTPStatus.INTERNAL_SERVER_ERROR,
    )
    busy = status == HTTPStatus.SERVICE_UNAVAILABLE
    return problem(status, str(exc), {"Retry-After": RETRY_AFTER_S} if busy else None)


def _unexpected(_: Request, exc: Exception) -> Response[dict[str, object]]:
    log.exception("unexpected error", exc_info=exc)
    return problem(500, "internal error; the service log has the details")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: _http_exception,
    HalflabelError: _halflabel_error,
    Exception: _unexpected,
}
