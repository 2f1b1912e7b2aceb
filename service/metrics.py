"""Prometheus metrics the service exports at `/metrics`, the middleware that counts and times
requests, and the listener that serves the metrics without an API key on a port of their own.

With several worker processes (service.workers sets PROMETHEUS_MULTIPROC_DIR before they start)
prometheus_client keeps each process's samples in files there and `EXPORTED` sums them, so any
worker answers for all; each gauge says how (`multiprocess_mode`). Collectors that read shared
state at scrape time (the labelling queue, the GPUs) register on `EXPORTED` too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from litestar.types import ASGIApp, HTTPScope, Message, Receive, ReceiveMessage, Scope, Send
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    multiprocess,
)
from prometheus_client.exposition import ThreadingWSGIServer

from models.errors import HalflabelError

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    EXPORTED = CollectorRegistry()
    multiprocess.MultiProcessCollector(EXPORTED)  # type: ignore[no-untyped-call]
else:
    EXPORTED = REGISTRY

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
APP_NAME = "halflabel"  # the requests' app_name label, as Litestar's middleware named it

REQUESTS = Counter(
    "halflabel_requests", "Requests answered", ["method", "path", "status_code", "app_name"]
)
REQUEST_DURATION = Histogram(
    "halflabel_request_duration_seconds",
    "Time from routing a request to the end of its answer, in seconds",
    ["method", "path", "status_code", "app_name"],
)
REQUESTS_IN_PROGRESS = Gauge(
    "halflabel_requests_in_progress",
    "Requests being answered",
    ["method", "path", "app_name"],
    multiprocess_mode="livesum",
)

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

BATCH_SIZE = Histogram(
    "halflabel_batch_size",
    "Inputs per inference batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_WAIT = Histogram(
    "halflabel_queue_wait_seconds", "Time an input waited for its batch", ["model"], buckets=_FAST
)
INFERENCE_TIME = Histogram(
    "halflabel_inference_seconds", "ONNX Runtime time per batch", ["model"], buckets=_FAST
)
INFERENCE_QUEUE_DEPTH = Gauge(
    "halflabel_inference_queue_depth",
    "Inputs admitted and not yet answered (the HPA scales on it)",
    multiprocess_mode="livesum",
)
REJECTED_INPUTS = Counter(
    "halflabel_rejected_inputs", "Inputs refused with 503 because the batching queue was full"
)
REQUESTS_REFUSED = Counter(
    "halflabel_requests_refused",
    "Inference requests answered 503 from their headers: HALFLABEL_MAX_REQUESTS_IN_FLIGHT were "
    "being answered (not in halflabel_requests_total, which counts routed requests)",
)
DECODES_REFUSED = Counter(
    "halflabel_decodes_refused",
    "Requests refused with 503 because HALFLABEL_MAX_PIXELS_IN_FLIGHT were being decoded",
)
PREDICTIONS = Counter("halflabel_predictions", "Predictions made", ["model"])
LOW_CONFIDENCE = Counter(
    "halflabel_low_confidence_predictions",
    "Predictions above the entropy threshold (queued for labelling); divide by predictions",
    ["model"],
)
ENTROPY = Histogram(
    "halflabel_prediction_normalized_entropy",
    "Normalized entropy (0..1) of predictions",
    ["model"],
    buckets=tuple(i / 10 for i in range(1, 11)),
)
QUEUE_PUSH_FAILURES = Counter(
    "halflabel_labelling_push_failures", "Failed pushes to the Redis labelling queue (retried)"
)
QUEUE_PUSH_DROPPED = Counter(
    "halflabel_labelling_push_dropped",
    "Low-confidence inputs given up: the spool was full or unwritable, or the queue refused them",
)
QUEUE_PUSH_BUFFERED = Gauge(
    "halflabel_labelling_push_buffered",
    "Low-confidence inputs in the spool, not yet in Redis",
    multiprocess_mode="livesum",
)
# The oldest version any worker serves: workers load a new one each in its own time.
MODEL_VERSION = Gauge(
    "halflabel_model_version",
    "Version of the model being served",
    ["model"],
    multiprocess_mode="livemin",
)
MODEL_LOAD_FAILURES = Counter(
    "halflabel_model_load_failures", "New versions refused (broken or tampered)", ["model"]
)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per scrape otherwise
        pass


@contextlib.contextmanager
def metrics_listener(host: str, port: int, *, shared: bool = False) -> Iterator[None]:
    """Serve every metric at http://host:port/metrics, without a key, while inside; port 0: off.

    It runs in threads of its own, so a slow scrape never holds up the event loop. `shared`:
    other worker processes of this service listen on the same port (SO_REUSEPORT).
    """
    if not port:
        yield
        return

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        allow_reuse_port = shared  # whichever worker the kernel picks answers for all

    try:
        server = make_server(host, port, make_wsgi_app(EXPORTED), Server, _QuietHandler)
    except OSError as exc:
        raise HalflabelError(
            f"cannot listen for metrics on {host}:{port} ({exc.strerror}); "
            "pick a free HALFLABEL_METRICS_PORT, or 0 for none"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def request_metrics_middleware(app: ASGIApp) -> ASGIApp:
    """Counts and times every routed HTTP request by method, route template and status.

    An answer whose client left before it is status 499, so a client that disconnects
    mid-request is counted apart and never as a server error. Written for this service rather
    than Litestar's Prometheus middleware, which builds a Request and label dictionaries per
    request on the hot path.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        http = cast("HTTPScope", scope)
        method, path = http["method"], http["path_template"]
        status = 500  # what the client sees if the app raises before answering
        gone = False

        async def watched_receive() -> ReceiveMessage:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def marked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = CLIENT_CLOSED_REQUEST if gone else message["status"]
                if gone:
                    message = {**message, "status": status}
            await send(message)

        in_progress = REQUESTS_IN_PROGRESS.labels(method, path, APP_NAME)
        in_progress.inc()
        try:
            await app(scope, watched_receive, marked_send)
        finally:
            in_progress.dec()
            labels = (method, path, str(status), APP_NAME)
            REQUESTS.labels(*labels).inc()
            REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - started)

    return middleware
