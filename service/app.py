"""The app factory: `create_app(settings)` loads the model and returns the Litestar app.

App state, for route modules: `settings` (Settings), `redis` (a `redis.asyncio` client),
`model_host` (ModelHost; `model_host.current.manifest` is the served manifest, classes
included) and `predictor` (Predictor).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import redis
import redis.asyncio
from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from prometheus_client import REGISTRY

from models.queue import LabellingQueue
from service.api import v1_router
from service.labelling import QueueMetrics, labelling_router
from service.metrics import client_gone_middleware
from service.model_host import ModelHost
from service.oip import v2_router
from service.predictor import Predictor
from service.problems import EXCEPTION_HANDLERS
from service.queue_pusher import QueuePusher
from service.security import requires_scope
from service.settings import Settings

REDIS_TIMEOUT_S = 2.0
# Requests by method, route template and status, and their latency histogram.
REQUEST_METRICS = PrometheusConfig(app_name="halflabel", prefix="halflabel", group_path=True)


class MetricsController(PrometheusController):
    path = "/metrics"
    guards = [requires_scope("admin")]


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the service; raises HalflabelError when the model cannot be loaded."""
    settings = settings or Settings()
    # One inference thread: ORT parallelises each batch itself, and batches queue up meanwhile.
    host = ModelHost(settings, ThreadPoolExecutor(1, thread_name_prefix="inference"))
    host.load()
    queue_client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    labelling_queue = LabellingQueue(queue_client, settings.queue_prefix)
    pusher = QueuePusher(labelling_queue, settings.push_buffer_size)
    state = State(
        {
            "settings": settings,
            "redis": redis.asyncio.Redis.from_url(
                settings.redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            ),
            "model_host": host,
            "predictor": Predictor(settings, host, pusher),
        }
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        host.start()
        queue_metrics = QueueMetrics(labelling_queue)
        REGISTRY.register(queue_metrics)
        tasks = [asyncio.create_task(pusher.run()), asyncio.create_task(host.poll())]
        try:
            yield
        finally:
            REGISTRY.unregister(queue_metrics)
            for task in tasks:
                task.cancel()
            await host.close()
            await app.state.redis.aclose()
            queue_client.close()

    return Litestar(
        route_handlers=[v1_router, v2_router, MetricsController, labelling_router],
        state=state,
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[REQUEST_METRICS.middleware, client_gone_middleware],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="halflabel", version="1", path="/schema"),
    )
