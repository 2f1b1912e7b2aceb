"""Queue metrics for Prometheus, read from the shared Redis at scrape time."""

from __future__ import annotations

import redis
from conftest import REDIS_URL, free_port
from prometheus_client import CollectorRegistry, generate_latest

from models.queue import LabellingQueue
from service.labelling import QueueMetrics
from tests.test_queue import push_greys


def scrape(queue: LabellingQueue) -> str:
    registry = CollectorRegistry()
    registry.register(QueueMetrics(queue))
    return generate_latest(registry).decode()


def test_full_queue_drops_are_counted(queue_prefix: str) -> None:
    queue = LabellingQueue.from_url(REDIS_URL, queue_prefix, max_tasks=2)
    push_greys(queue, [10, 20, 30, 40])
    queue.claim("ann")
    text = scrape(queue)
    assert 'halflabel_labelling_tasks{state="pending"} 1.0' in text
    assert 'halflabel_labelling_tasks{state="claimed"} 1.0' in text
    assert "halflabel_labelling_dropped_total 2.0" in text


def test_an_outage_leaves_the_series_out_instead_of_failing_the_scrape() -> None:
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    assert "halflabel_labelling" not in scrape(LabellingQueue(unreachable, "nowhere"))
