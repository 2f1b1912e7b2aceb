"""Pushes low-confidence inputs to the Redis labelling queue without ever failing a prediction.

Predictions only drop tasks into a bounded in-memory buffer; a background task pushes them to
Redis and, while Redis is down, keeps them and retries. What does not fit in the buffer is
counted in `halflabel_labelling_push_dropped` and lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from redis.exceptions import RedisError

from models.queue import LabellingQueue, TaskRecord
from service import metrics

log = logging.getLogger(__name__)


class QueuePusher:
    """A bounded buffer in front of a LabellingQueue, drained by `run`."""

    def __init__(
        self, queue: LabellingQueue, capacity: int, retry_interval_s: float = 1.0
    ) -> None:
        self.queue = queue
        self.capacity = capacity
        self.retry_interval_s = retry_interval_s
        self._buffer: deque[tuple[TaskRecord, bytes]] = deque()
        self._ready = asyncio.Event()
        self._failing = False

    def offer(self, record: TaskRecord, image: bytes) -> bool:
        """Buffer a task for pushing; False (and counted) when the buffer is full."""
        if len(self._buffer) >= self.capacity:
            metrics.QUEUE_PUSH_DROPPED.inc()
            return False
        self._buffer.append((record, image))
        metrics.QUEUE_PUSH_BUFFERED.set(len(self._buffer))
        self._ready.set()
        return True

    async def run(self) -> None:
        """Push buffered tasks forever, oldest first, retrying while Redis is unreachable."""
        while True:
            await self._ready.wait()
            while self._buffer:
                if not await self._push_oldest():
                    await asyncio.sleep(self.retry_interval_s)
            self._ready.clear()

    async def _push_oldest(self) -> bool:
        record, image = self._buffer[0]
        try:
            # LabellingQueue is synchronous; a thread keeps the event loop free.
            await asyncio.to_thread(self.queue.push, record, image)
        except RedisError as exc:
            metrics.QUEUE_PUSH_FAILURES.inc()
            if not self._failing:  # once per outage, not once per retry
                log.warning("labelling queue unreachable, buffering its tasks: %s", exc)
            self._failing = True
            return False
        except Exception:  # a task the queue refuses would otherwise block all later ones
            log.exception("dropping a labelling task the queue refused")
            metrics.QUEUE_PUSH_DROPPED.inc()
        if self._failing:
            log.warning("labelling queue reachable again, pushing the buffered tasks")
        self._failing = False
        self._buffer.popleft()
        metrics.QUEUE_PUSH_BUFFERED.set(len(self._buffer))
        return True
