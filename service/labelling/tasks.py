"""Routes on the queue's tasks: claim under a lease, fetch the image, label, release, stats.

Handlers use the synchronous `LabellingQueue` on Litestar's worker threads, so Redis calls never
block the event loop.
"""

from __future__ import annotations

import re
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

from litestar import Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import Parameter

from models.queue import (
    TASK_ID_PATTERN,
    LabellingQueue,
    LabelOutcome,
    QueueStats,
    Task,
    TaskRecord,
    UnknownClassError,
)
from models.repository import ModelRepository
from service.labelling.schemas import (
    ClaimResponse,
    LabelRequest,
    LabelResponse,
    ReleaseRequest,
    ReleaseResponse,
    TaskView,
)

MAX_CLAIM = 50

Labeller = Annotated[str, Parameter(min_length=1, max_length=100, description="Who claims")]
Limit = Annotated[int, Parameter(ge=1, le=MAX_CLAIM, description="How many tasks to claim")]


def refusal(status: HTTPStatus, detail: str) -> HTTPException:
    """An HTTP error whose detail says what went wrong (rendered as problem+json)."""
    return HTTPException(status_code=status, detail=detail)


@lru_cache(maxsize=64)
def _classes(model_dir: Path, name: str, version: int) -> tuple[str, ...]:
    # Versions are immutable, so the classes of one never change.
    return ModelRepository(model_dir).resolve(name, version).manifest.classes


def classes_of(state: State, record: TaskRecord) -> tuple[str, ...]:
    """The classes of the model version that queued the task: the labels it accepts."""
    return _classes(state.settings.model_dir, record.model_name, record.model_version)


def checked_id(task_id: str) -> str:
    """`task_id` if it has the shape of a task id, else a 404 saying what one looks like."""
    if not re.match(TASK_ID_PATTERN, task_id):
        raise refusal(
            HTTPStatus.NOT_FOUND, f"no task {task_id[:80]!r}: task ids are 64 hex characters"
        )
    return task_id


def existing_task(queue: LabellingQueue, task_id: str) -> Task:
    """The stored task, else a 404."""
    task = queue.task(checked_id(task_id))
    if task is None:
        raise refusal(
            HTTPStatus.NOT_FOUND, f"no task {task_id}: it was never queued, or dropped or expired"
        )
    return task


def _view(state: State, task: Task) -> TaskView:
    record = task.record
    return TaskView(
        id=record.id,
        image_url=f"/v1/labelling/tasks/{record.id}/image",
        model_name=record.model_name,
        model_version=record.model_version,
        classes=list(classes_of(state, record)),
        guesses=record.guesses,
        normalized_entropy=record.normalized_entropy,
        hits=task.hits,
        lease_expires_at=task.lease_expires_at,
    )


@get("/tasks", sync_to_thread=True)
def claim_tasks(
    state: State, queue: LabellingQueue, limit: Limit = 1, labeller: Labeller = "anonymous"
) -> ClaimResponse:
    """Claim up to `limit` of the most uncertain tasks; each is yours until its lease ends."""
    tasks = queue.claim(labeller, limit)
    views = [_view(state, task) for task in tasks]
    return ClaimResponse(labeller=labeller, lease_seconds=queue.lease_seconds, tasks=views)


@get("/tasks/{task_id:str}/image", sync_to_thread=True)
def task_image(queue: LabellingQueue, task_id: str) -> Response[bytes]:
    """The image of a task not yet labelled."""
    task = existing_task(queue, task_id)
    image = queue.image(task_id)
    if image is None:
        raise refusal(
            HTTPStatus.GONE, f"task {task_id} has no image any more: it is labelled or expired"
        )
    return Response(
        image, media_type=task.record.content_type, headers={"Cache-Control": "private"}
    )


@post("/tasks/{task_id:str}/label", sync_to_thread=True, status_code=HTTPStatus.OK)
def label_task(
    state: State, queue: LabellingQueue, task_id: str, data: LabelRequest
) -> LabelResponse:
    """Label a task; the same label twice is one record. Accepted after the lease ran out too."""
    task = existing_task(queue, task_id)
    try:
        classes = classes_of(state, task.record)
        outcome, label = queue.label(task_id, data.label, data.labeller, classes)
    except UnknownClassError as exc:
        raise refusal(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
    if outcome is LabelOutcome.CONFLICT:
        raise refusal(
            HTTPStatus.CONFLICT,
            f"task {task_id} is already labelled {label!r}; the first label stands",
        )
    if outcome is LabelOutcome.IMAGE_EXPIRED:
        raise refusal(HTTPStatus.GONE, f"task {task_id}'s image expired; it cannot be labelled")
    if outcome is LabelOutcome.UNKNOWN_TASK:
        raise refusal(HTTPStatus.NOT_FOUND, f"no task {task_id}: it was dropped or expired")
    return LabelResponse(task_id=task_id, label=data.label, outcome=outcome)


@post("/tasks/{task_id:str}/release", sync_to_thread=True, status_code=HTTPStatus.OK)
def release_task(queue: LabellingQueue, task_id: str, data: ReleaseRequest) -> ReleaseResponse:
    """Give a claimed task back to the queue before its lease ends."""
    if not queue.release(checked_id(task_id), data.labeller):
        raise refusal(
            HTTPStatus.CONFLICT,
            f"task {task_id} is not claimed by {data.labeller!r}; only its holder can release it",
        )
    return ReleaseResponse(task_id=task_id, released=True)


@get("/stats", sync_to_thread=True)
def queue_stats(queue: LabellingQueue) -> QueueStats:
    """How many tasks wait, are claimed and are labelled; how many were dropped or expired.
    A lease that ran out counts as waiting (and lease_expired) at once."""
    return queue.stats()


TASK_ROUTES = [claim_tasks, task_image, label_task, release_task, queue_stats]
