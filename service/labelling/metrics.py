"""Prometheus metrics of the shared labelling queue, so every replica reports the same queue.

A scrape never waits on Redis: `refresh_forever` reads the queue's stats in the background, each
read bounded by a timeout, and `collect` answers from the last read. While Redis is unreachable
or hung the series are left out (a gap, not stale numbers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models.queue import LabellingQueue, QueueStats

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 5.0
REFRESH_TIMEOUT_S = 2.0


class QueueMetrics(Collector):
    """Queue depth and counters from a cache. Register once per process:
    `service.metrics.EXPORTED.register(QueueMetrics(queue))`, then run `refresh_forever()` as a
    task."""

    def __init__(self, queue: LabellingQueue) -> None:
        self.queue = queue
        self.stats: QueueStats | None = None

    def refresh(self) -> None:
        """Read the stats now (blocking; the background loop runs it on a thread)."""
        self.stats = self.queue.stats()

    async def refresh_forever(
        self, interval_s: float = REFRESH_INTERVAL_S, timeout_s: float = REFRESH_TIMEOUT_S
    ) -> None:
        """Refresh every `interval_s`; a read that fails or outlasts `timeout_s` clears the
        cache until a read succeeds again."""
        failing = False
        while True:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.refresh), timeout_s)
            except (redis.RedisError, TimeoutError) as exc:
                self.stats = None
                if not failing:  # once per outage, not once per refresh
                    log.warning("labelling queue stats unavailable: %r", exc)
                failing = True
            else:
                failing = False
            await asyncio.sleep(interval_s)

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        tasks = GaugeMetricFamily(
            "halflabel_labelling_tasks", "Labelling tasks by state", labels=["state"]
        )
        tasks.add_metric(["pending"], stats.pending)
        tasks.add_metric(["claimed"], stats.claimed)
        yield tasks
        for name, value, meaning in (
            ("labelled", stats.labelled, "Tasks labelled"),
            ("dropped", stats.dropped, "Tasks dropped because the queue was full"),
            ("lease_expired", stats.lease_expired, "Claims whose lease ran out unlabelled"),
        ):
            yield CounterMetricFamily(f"halflabel_labelling_{name}", meaning, value=value)
