"""The app factory: `create_app(settings)` loads the model and returns the Litestar app.

App state, for route modules: `settings` (Settings), `labelling_queue` (LabellingQueue, on the
service's one Redis client, which the pusher and the queue metrics share), `model_host`
(ModelHost; `model_host.current.manifest` is the served manifest, classes included) and
`predictor` (Predictor).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import redis
from litestar import Controller, Litestar, Response, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.queue import LabellingQueue
from service.api import v1_router
from service.gpu_metrics import gpu_metrics
from service.labelling import QueueMetrics, labelling_router
from service.metrics import EXPORTED, metrics_listener, request_metrics_middleware
from service.model_host import ModelHost
from service.oip import v2_router
from service.predictor import Predictor
from service.problems import EXCEPTION_HANDLERS
from service.queue_pusher import QueuePusher
from service.security import requires_scope
from service.settings import Settings
from service.spool import Spool

REDIS_TIMEOUT_S = 2.0
REDIS_CLIENT_NAME = "halflabel-service"


class MetricsController(Controller):
    path = "/metrics"
    guards = [requires_scope("admin")]

    @get(sync_to_thread=False)
    def metrics(self) -> Response[bytes]:
        return Response(generate_latest(EXPORTED), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the service; raises HalflabelError when the model cannot be loaded."""
    settings = settings or Settings()
    # One inference thread: ORT parallelises each batch itself, and batches queue up meanwhile.
    host = ModelHost(settings, ThreadPoolExecutor(1, thread_name_prefix="inference"))
    host.load()
    queue_client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        client_name=REDIS_CLIENT_NAME,  # how Redis's CLIENT LIST shows the service
    )
    labelling_queue = LabellingQueue(
        queue_client, settings.queue_prefix, lease_seconds=settings.label_lease_seconds
    )
    spool = Spool(settings.spool_dir, settings.push_buffer_size, settings.spool_max_bytes)
    pusher = QueuePusher(labelling_queue, spool)
    queue_metrics = QueueMetrics(labelling_queue)
    state = State(
        {
            "settings": settings,
            "labelling_queue": labelling_queue,
            "model_host": host,
            "predictor": Predictor(settings, host, pusher),
        }
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        host.start()
        EXPORTED.register(queue_metrics)
        pusher.start()
        tasks = [asyncio.create_task(job) for job in (host.poll(), queue_metrics.refresh_forever())]
        listener = metrics_listener(
            settings.host, settings.metrics_port, shared=settings.workers > 1
        )
        try:
            with gpu_metrics(), listener:
                yield
        finally:
            EXPORTED.unregister(queue_metrics)
            for task in tasks:
                task.cancel()
            await pusher.close()
            await host.close()
            queue_client.close()

    return Litestar(
        route_handlers=[v1_router, v2_router, MetricsController, labelling_router],
        state=state,
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[request_metrics_middleware],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="halflabel", version="1", path="/schema"),
    )
