"""The HTTP server: uvicorn with httptools, plus the connection-level limits it lacks.

uvicorn bounds idle keep-alive, the accept backlog and the shutdown grace period itself. With
httptools it has no limit on the size or number of headers, and no deadline for receiving a
request: `timeout_keep_alive` only runs between requests and every byte resets it, so a client
that sends nothing, or trickles its headers, holds a connection and its buffers forever
(uvicorn issue #157). `LimitedProtocol` adds those limits, caps open connections, and answers
what it refuses, and uvicorn's own protocol-level 400, as problem+json.

Under overload it refuses inference requests once `max_requests_in_flight` requests are being
answered, from their headers, before a body is read or an ASGI task is made: a refusal costs a
small fraction of the request it turns away, so what the server can do goes to the requests
it took (uvicorn's `limit_concurrency` refuses every route, health checks included, and runs
each refusal through an ASGI task).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import uvicorn
from litestar import Litestar
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from models.errors import HalflabelError
from service import metrics
from service.security import is_loopback
from service.settings import Settings

log = logging.getLogger(__name__)
EXAMPLE_IMAGE = "docs/example-digit.png"
FILES_BESIDE_CONNECTIONS = 256  # the model, Redis, logs, the spool, the listening socket...
INFERENCE_PATHS = (b"/predict", b"/infer")  # POST routes that run the model (service.api, oip)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request the limits refuse."""


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, built from the settings, which the protocol reads too; `app` is
    the app, or (for service.workers) a function each worker calls to build its own."""

    def __init__(self, app: Litestar | Callable[[], Litestar], settings: Settings) -> None:
        super().__init__(
            app,
            factory=not isinstance(app, Litestar),
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            http=LimitedProtocol,
            log_level=settings.log_level,
            access_log=False,
            backlog=settings.backlog,
            timeout_keep_alive=settings.keep_alive_timeout_s,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
        self.settings = settings
        # Written as is to every request turned away under overload: a refusal must cost little.
        self.turn_away_detail = (
            f"{settings.max_requests_in_flight} requests are being answered "
            "(HALFLABEL_MAX_REQUESTS_IN_FLIGHT); retry after a short wait"
        )
        self.turn_away_answer = _problem(
            HTTPStatus.SERVICE_UNAVAILABLE, self.turn_away_detail, keep_alive=True
        )


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits, receive deadlines and a connection cap."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, ServerConfig)
        self.server_config = config
        self.limits = config.settings
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting_headers = True
        self._header_bytes_received = 0  # while the current request's headers are incomplete
        self._refusal: tuple[HTTPStatus, str] | None = None
        self._turned_away = False  # the current request was answered 503 from its headers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._answer_and_close(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server holds its maximum of {self.limits.max_connections} connections; "
                "retry later",
            )
            return
        self._arm(self.limits.header_timeout_s, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            if self._deadline is None:
                self._arm(self.limits.header_timeout_s, self._headers_too_slow)
            self._header_bytes_received += len(data)
        super().data_received(data)
        # The parser buffers headers until they are complete: this bounds that buffer to the
        # limit plus one read (the exact check, once they are complete, is on_headers_complete).
        too_long = self._header_bytes_received > self.limits.max_header_bytes
        if self._awaiting_headers and too_long and not self.transport.is_closing():
            self._answer_and_close(*self._headers_too_large())

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) for name, value in self.headers)
        if size > self.limits.max_header_bytes or len(self.headers) > self.limits.max_header_count:
            self._refusal = self._headers_too_large()
            raise _Refused  # httptools stops parsing; uvicorn then calls send_400_response
        self._awaiting_headers = False
        self._header_bytes_received = 0
        self._arm(self.limits.body_timeout_s, self._body_too_slow)
        if self._overloaded():
            self._turn_away()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._turned_away:  # a refused request's body is read and dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._awaiting_headers = True
        if not self._turned_away:
            super().on_message_complete()
            return
        self._turned_away = False
        if self.parser.should_keep_alive():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        else:
            self.transport.close()

    def _overloaded(self) -> bool:
        """An inference request while `max_requests_in_flight` are being answered (`tasks` holds
        the ASGI task of each request in flight in this process, on any connection)."""
        return (
            len(self.tasks) >= self.limits.max_requests_in_flight
            and self.parser.get_method() == b"POST"
            and self.url.partition(b"?")[0].endswith(INFERENCE_PATHS)
            # a request pipelined behind one still being answered must wait its turn
            and (self.cycle is None or self.cycle.response_complete)
        )

    def _turn_away(self) -> None:
        """Answer 503 now; the body that follows is dropped (or, for a client waiting on
        `Expect: 100-continue`, which sends none, the connection is closed)."""
        metrics.REQUESTS_REFUSED.inc()
        if self.expect_100_continue:
            self._answer_and_close(
                HTTPStatus.SERVICE_UNAVAILABLE, self.server_config.turn_away_detail
            )
            return
        self._turned_away = True
        if self.parser.should_keep_alive():
            self.transport.write(self.server_config.turn_away_answer)
        else:  # closed once the body is in, so that the client reads the answer, not a reset
            detail = self.server_config.turn_away_detail
            self.transport.write(_problem(HTTPStatus.SERVICE_UNAVAILABLE, detail, keep_alive=False))

    def send_400_response(self, msg: str) -> None:
        status, detail = self._refusal or (
            HTTPStatus.BAD_REQUEST, f"malformed HTTP request ({msg.rstrip('.')}); send HTTP/1.1"
        )
        self._answer_and_close(status, detail)

    def _headers_too_large(self) -> tuple[HTTPStatus, str]:
        return (
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"request headers over {self.limits.max_header_bytes} bytes or "
            f"{self.limits.max_header_count} fields; send fewer or smaller headers",
        )

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            log.info("closing a connection whose request headers took too long: %s", self.client)
            self._answer_and_close(
                HTTPStatus.REQUEST_TIMEOUT,
                f"request headers not received within {self.limits.header_timeout_s:g}s",
            )
        else:  # a pipelined request behind one being answered: writing now would garble it
            self.transport.close()

    def _body_too_slow(self) -> None:
        # The app is already reading this body; closing makes it see a disconnect.
        self._deadline = None
        log.info("closing a connection whose request body took too long: %s", self.client)
        self.transport.close()

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _answer_and_close(self, status: HTTPStatus, detail: str) -> None:
        """Write a problem+json answer directly to the socket and close it."""
        self._disarm()
        self.transport.write(_problem(status, detail, keep_alive=False))
        self.transport.close()


def _problem(status: HTTPStatus, detail: str, *, keep_alive: bool) -> bytes:
    """A whole HTTP/1.1 problem+json response (a 503 says when to retry)."""
    body = json.dumps(
        {"type": "about:blank", "title": status.phrase, "status": status, "detail": detail}
    ).encode()
    retry = b"retry-after: 1\r\n" if status == HTTPStatus.SERVICE_UNAVAILABLE else b""
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\n"
        b"content-length: %d\r\n%sconnection: %s\r\n\r\n%s"
        % (status, status.phrase.encode(), len(body), retry, connection, body)
    )


class FileLimitError(HalflabelError):
    """The process may not open enough files for its connection cap."""


def raise_file_limit(settings: Settings) -> None:
    """Lift the soft open-file limit so that `max_connections` is reached before it is."""
    needed = settings.max_connections + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise FileLimitError(
                f"{settings.max_connections} connections need {needed} open files and the "
                f"limit is {hard}: lower HALFLABEL_MAX_CONNECTIONS or raise 'ulimit -n'"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Server(uvicorn.Server):
    """Prints how to get a first prediction once the socket is listening."""

    def __init__(self, app: Litestar, settings: Settings) -> None:
        super().__init__(ServerConfig(app, settings))
        self.settings = settings

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(curl_example(self.settings), flush=True)


def configure_logging(settings: Settings) -> None:
    """The service's log format and level, in each process that serves (uvicorn sets its own)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )


def curl_example(settings: Settings) -> str:
    """One curl command line that gets a prediction from this service."""
    host = settings.host if is_loopback(settings.host) else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    auth = " -H 'Authorization: Bearer <your key>'" if settings.api_keys else ""
    return (
        f"curl -s{auth} -H 'Content-Type: image/png' --data-binary @{EXAMPLE_IMAGE} "
        f"http://{host}:{settings.port}/v1/predict"
    )
