"""Queue metrics for Prometheus: read from the shared Redis in the background, served from a
cache, so a hung Redis never holds up a scrape or a prediction."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import REDIS_URL, grey_png, start_service, stop_service, tiny_env
from prometheus_client import CollectorRegistry, generate_latest

from models.queue import LabellingQueue
from models.repository import ModelRepository
from service.labelling import QueueMetrics
from tests.test_queue import push_greys
from tests.test_service_redis_outage import RedisServer, private_redis

__all__ = ["private_redis"]  # the fixture, imported for these tests

PNG = {"Content-Type": "image/png"}


def scrape(metrics: QueueMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(metrics)
    return generate_latest(registry).decode()


@contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """Redis stopped mid-flight (SIGSTOP): connections stay open, nothing answers."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_full_queue_drops_are_counted(queue_prefix: str) -> None:
    queue = LabellingQueue.from_url(REDIS_URL, queue_prefix, max_tasks=2)
    push_greys(queue, [10, 20, 30, 40])
    queue.claim("ann")
    metrics = QueueMetrics(queue)
    assert "halflabel_labelling" not in scrape(metrics)  # nothing read yet
    metrics.refresh()
    text = scrape(metrics)
    assert 'halflabel_labelling_tasks{state="pending"} 1.0' in text
    assert 'halflabel_labelling_tasks{state="claimed"} 1.0' in text
    assert "halflabel_labelling_dropped_total 2.0" in text


def test_a_hung_redis_leaves_the_series_out_until_it_answers_again(
    private_redis: RedisServer,
) -> None:
    queue = LabellingQueue.from_url(private_redis.url, "hung")
    push_greys(queue, [10, 20])
    metrics = QueueMetrics(queue)

    async def watch() -> list[str]:
        refresher = asyncio.create_task(metrics.refresh_forever(interval_s=0.1, timeout_s=0.3))
        seen = []
        await asyncio.sleep(0.3)
        seen.append(scrape(metrics))
        with hung(private_redis):
            await asyncio.sleep(0.8)
            started = time.monotonic()
            seen.append(scrape(metrics))
            assert time.monotonic() - started < 0.1
        await asyncio.sleep(2.5)  # the read stuck before SIGCONT finishes, then fresh ones
        seen.append(scrape(metrics))
        refresher.cancel()
        return seen

    before, during, after = asyncio.run(watch())
    assert 'halflabel_labelling_tasks{state="pending"} 2.0' in before
    assert "halflabel_labelling" not in during
    assert 'halflabel_labelling_tasks{state="pending"} 2.0' in after


def test_a_scrape_and_a_prediction_do_not_wait_for_a_hung_redis(
    model_repo: ModelRepository, private_redis: RedisServer, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, "hung", redis_url=private_redis.url)
    service = start_service(env, tmp_path / "service.log")

    def timed(method: str, path: str, **options: object) -> tuple[int, float]:
        started = time.monotonic()
        with service.client() as http:
            status = http.request(method, path, timeout=1, **options).status_code  # type: ignore[arg-type]
        return status, time.monotonic() - started

    try:
        with service.client() as http:
            http.post("/v1/predict", content=grey_png(0), headers=PNG)  # warm
            deadline = time.monotonic() + 10
            while "halflabel_labelling_tasks" not in http.get("/metrics").text:
                assert time.monotonic() < deadline, "queue metrics never appeared"
                time.sleep(0.2)
        with hung(private_redis), ThreadPoolExecutor(2) as pool:
            for level in (128, 0, 126, 255):  # the uncertain ones are queued, held meanwhile
                scrape_at_once = pool.submit(timed, "GET", "/metrics")
                predict = pool.submit(
                    timed, "POST", "/v1/predict", content=grey_png(level), headers=PNG
                )
                for answer in (scrape_at_once, predict):
                    status, seconds = answer.result()
                    assert status == 200 and seconds < 0.5, (status, seconds)
                time.sleep(0.5)
    except httpx.TimeoutException as exc:
        raise AssertionError("a scrape or a prediction waited for the hung Redis") from exc
    finally:
        stop_service(service)
