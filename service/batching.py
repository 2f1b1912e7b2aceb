"""Dynamic batching across concurrent requests, with Triton's knobs.

Inputs wait in a queue; a worker takes up to `max_batch_size` of them, waiting at most
`max_queue_delay_s` after the first for more, and runs the batch on a thread so the event loop
keeps accepting requests meanwhile. At most `max_queue_size` inputs are held at once, queued or
in a batch; a request that would exceed that is refused at once (503), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.engine import Outputs
from service.errors import BatcherClosedError, ServerBusyError, TooManyInputsError


@dataclass
class _Pending:
    array: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, float]]
    enqueued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Groups single inputs into batches for `run`, a blocking batched inference function."""

    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        executor: Executor,
        model_name: str,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
    ) -> None:
        self._run = run
        self._executor = executor
        self._batch_size = metrics.BATCH_SIZE.labels(model_name)
        self._queue_wait = metrics.QUEUE_WAIT.labels(model_name)
        self._inference_time = metrics.INFERENCE_TIME.labels(model_name)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._admitted = 0  # inputs taken and not yet answered, queued or in a batch
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._worker = asyncio.create_task(self._work())

    def check_room(self, count: int) -> None:
        """Refuse now (503, 413) if `count` more inputs do not fit; cheap, so routes call it
        before reading and decoding a body."""
        if self._closed:
            raise BatcherClosedError("model was replaced; retry")
        if count > self.max_queue_size:
            raise TooManyInputsError(
                f"{count} images in one request, over the queue's {self.max_queue_size}; "
                "send fewer per request"
            )
        if self._admitted + count > self.max_queue_size:
            metrics.REJECTED_INPUTS.inc(count)
            raise ServerBusyError("the inference queue is full; retry after a short wait")

    async def infer(self, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Probabilities and entropy for each input array, batched with everyone else's."""
        self.check_room(len(arrays))
        loop = asyncio.get_running_loop()
        pending = [_Pending(array, loop.create_future()) for array in arrays]
        for item in pending:
            self._queue.put_nowait(item)
        self._admitted += len(pending)
        metrics.INFERENCE_QUEUE_DEPTH.inc(len(pending))
        try:
            return list(await asyncio.gather(*(item.future for item in pending)))
        finally:
            self._admitted -= len(pending)
            metrics.INFERENCE_QUEUE_DEPTH.dec(len(pending))

    async def close(self) -> None:
        """Stop taking inputs, answer those already queued, then stop the worker."""
        self._closed = True
        await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                await self._answer(loop, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = batch[0].enqueued_at + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        # Requests that timed out while waiting need no inference.
        live = [item for item in batch if not item.future.done()]
        if not live:
            return
        started = time.perf_counter()
        for item in live:
            self._queue_wait.observe(started - item.enqueued_at)
        self._batch_size.observe(len(live))
        try:
            outputs = await loop.run_in_executor(
                self._executor, self._run, np.stack([item.array for item in live])
            )
        except Exception as exc:
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._inference_time.observe(time.perf_counter() - started)
        for i, item in enumerate(live):
            if not item.future.done():
                item.future.set_result((outputs.probabilities[i], float(outputs.entropy[i])))
