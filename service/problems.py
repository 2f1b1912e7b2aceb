"""Every error answer in one place: `application/problem+json` (RFC 9457) with a one-line
`detail` on /v1 and the rest, `{"error": "..."}` on /v2 as the Open Inference Protocol (and so
Triton's and KServe's clients) expect."""

from __future__ import annotations

import logging
from http import HTTPStatus

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from models.errors import HalflabelError, InvalidImageError, ModelNotFoundError, UnknownClassError
from service.errors import (
    BadInputError,
    BatcherClosedError,
    ClientGoneError,
    RequestTimeoutError,
    ServerBusyError,
    TooManyInputsError,
    UnsupportedMediaTypeError,
)
from service.metrics import CLIENT_CLOSED_REQUEST

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = "1"
OIP_PREFIX = "/v2"

STATUS_OF: dict[type[HalflabelError], int] = {
    BadInputError: HTTPStatus.BAD_REQUEST,
    ModelNotFoundError: HTTPStatus.NOT_FOUND,
    TooManyInputsError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    UnsupportedMediaTypeError: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    InvalidImageError: HTTPStatus.UNPROCESSABLE_ENTITY,
    UnknownClassError: HTTPStatus.UNPROCESSABLE_ENTITY,
    ServerBusyError: HTTPStatus.SERVICE_UNAVAILABLE,
    BatcherClosedError: HTTPStatus.SERVICE_UNAVAILABLE,
    RequestTimeoutError: HTTPStatus.GATEWAY_TIMEOUT,
    ClientGoneError: CLIENT_CLOSED_REQUEST,
}
"""Each error kind's HTTP status; kinds not here (start-up errors) would be a 500."""


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None
) -> Response[dict[str, object]]:
    """A problem+json response."""
    closed = status == CLIENT_CLOSED_REQUEST  # nginx's code, not in HTTPStatus
    title = "Client Closed Request" if closed else HTTPStatus(status).phrase
    body = {"type": "about:blank", "title": title, "status": status}
    return Response(
        {**body, "detail": detail}, status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def error_response(
    request: Request, status: int, detail: str, headers: dict[str, str] | None = None
) -> Response[dict[str, object]]:
    """The error in the shape the route's protocol uses."""
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers = {"Retry-After": RETRY_AFTER_S, **(headers or {})}
    if request.url.path.startswith(OIP_PREFIX):
        return Response({"error": detail}, status_code=status, headers=headers)
    return problem(status, detail, headers)


def _http_exception(request: Request, exc: HTTPException) -> Response[dict[str, object]]:
    return error_response(request, exc.status_code, _explain(request, exc), exc.headers)


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


def _halflabel_error(request: Request, exc: HalflabelError) -> Response[dict[str, object]]:
    status = next(
        (code for kind, code in STATUS_OF.items() if isinstance(exc, kind)),
        HTTPStatus.INTERNAL_SERVER_ERROR,
    )
    return error_response(request, status, str(exc))


def _unexpected(request: Request, exc: Exception) -> Response[dict[str, object]]:
    log.exception("unexpected error", exc_info=exc)
    return error_response(request, 500, "internal error; the service log has the details")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: _http_exception,
    HalflabelError: _halflabel_error,
    Exception: _unexpected,
}
