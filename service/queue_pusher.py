"""Pushes low-confidence inputs to the Redis labelling queue without ever failing a prediction.

Predictions only write tasks into the on-disk spool (service.spool); a background task pushes
them to Redis, oldest first, and removes each once Redis has it. While Redis is down they stay
in the spool and are retried; a restart pushes what an earlier process left. What does not fit
in the spool is answered `queued_for_labelling: false`, logged, and counted in
`halflabel_labelling_push_dropped_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from redis.exceptions import RedisError

from models.queue import LabellingQueue, TaskRecord
from service import metrics
from service.spool import Spool, read_entry

log = logging.getLogger(__name__)


class QueuePusher:
    """Moves tasks from a Spool into a LabellingQueue, in `run`."""

    def __init__(
        self,
        queue: LabellingQueue,
        spool: Spool,
        retry_interval_s: float = 1.0,
        sync_interval_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.retry_interval_s = retry_interval_s
        self.sync_interval_s = sync_interval_s
        self._ready = asyncio.Event()
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        metrics.QUEUE_PUSH_BUFFERED.set(len(spool))

    def offer(self, record: TaskRecord, image: bytes) -> bool:
        """Spool a task for pushing; False (logged and counted) when the spool cannot take it."""
        refused = self.spool.add(record, image)
        if refused:
            metrics.QUEUE_PUSH_DROPPED.inc()
            log.warning("not queueing input %s for labelling: %s", record.id, refused)
            return False
        metrics.QUEUE_PUSH_BUFFERED.set(len(self.spool))
        self._ready.set()
        return True

    def start(self) -> None:
        """Push spooled tasks in the background (those left by an earlier process first), and
        fsync the ones still waiting every `sync_interval_s`."""
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop pushing, make what is still spooled durable, and release the spool."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sync()
        self.spool.close()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._push_forever())
            tasks.create_task(self._sync_forever())

    async def sync(self) -> None:
        """fsync the entries written since the last sync (in a thread: it waits for the disk)."""
        await asyncio.to_thread(self.spool.sync, self.spool.take_unsynced())

    async def _push_forever(self) -> None:
        while True:
            self._ready.clear()
            while (path := self.spool.oldest()) is not None:
                if not await self._push(path):
                    await asyncio.sleep(self.retry_interval_s)
            await self._ready.wait()

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            await self.sync()

    async def _push(self, path: Path) -> bool:
        """Push one entry; False while Redis is unreachable (the entry stays)."""
        try:
            # LabellingQueue is synchronous, and reading the file waits for the disk: a thread
            # keeps the event loop free.
            await asyncio.to_thread(self._read_and_push, path)
        except RedisError as exc:
            metrics.QUEUE_PUSH_FAILURES.inc()
            if not self._failing:  # once per outage, not once per retry
                log.warning("labelling queue unreachable, keeping its tasks in the spool: %s", exc)
            self._failing = True
            return False
        except Exception:  # an entry the queue refuses would otherwise block all later ones
            log.exception("dropping labelling task %s: the queue refused it", path.name)
            metrics.QUEUE_PUSH_DROPPED.inc()
        if self._failing:
            log.warning("labelling queue reachable again, pushing the spooled tasks")
        self._failing = False
        self.spool.remove_oldest()
        metrics.QUEUE_PUSH_BUFFERED.set(len(self.spool))
        return True

    def _read_and_push(self, path: Path) -> None:
        self.queue.push(*read_entry(path))

