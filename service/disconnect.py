"""Work for a request stops when its client leaves, so inputs nobody waits for are never run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from litestar import Request

from service.errors import ClientGoneError

T = TypeVar("T")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (after the body was read); cancel it when the client disconnects first.

    Cancelling drops the request's inputs still waiting in the batcher.
    """
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((working, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            task.cancel()
    if not working.done() or working.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await working
        raise ClientGoneError("the client disconnected before its answer")
    return working.result()


async def _disconnect(request: Request) -> None:
    # Once the body is read, the server's next message for this request is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
