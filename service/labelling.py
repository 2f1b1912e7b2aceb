"""Labelling over HTTP (scope `label`) and the `/label` page.

Routes under `/v1/labelling`: claim tasks under a lease, fetch a task's image, label, release,
queue stats, and exports of the label store (an image folder as zip, Label Studio tasks).
Handlers use the synchronous `LabellingQueue` on Litestar's worker threads, so Redis calls
never block the event loop. The lease length is `HALFLABEL_LABEL_LEASE_SECONDS`.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import re
import zipfile
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import redis
from litestar import MediaType, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.params import Parameter
from litestar.static_files import create_static_files_router
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.labels import LabelRecord, LabelStore
from models.queue import (
    DEFAULT_LEASE_SECONDS,
    TASK_ID_PATTERN,
    Guess,
    LabellingQueue,
    LabelOutcome,
    QueueStats,
    Task,
    TaskRecord,
    UnknownClassError,
)
from models.repository import ModelRepository
from service.problems import problem
from service.security import requires_scope

STATIC_DIR = Path(__file__).parent / "static"
LABEL_PAGE = STATIC_DIR / "label.html"
MAX_CLAIM = 50
REDIS_TIMEOUT_S = 2.0


class LabellingSettings(BaseSettings):
    """Labelling knobs: `HALFLABEL_LABEL_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_LABEL_")

    lease_seconds: float = Field(
        default=DEFAULT_LEASE_SECONDS, gt=0, description="How long a claimed task stays reserved"
    )


class TaskView(BaseModel):
    """A claimed task, with what a labeller needs to label it."""

    id: str
    image_url: str
    model_name: str
    model_version: int
    classes: list[str] = Field(description="The labels this task accepts")
    guesses: list[Guess] = Field(description="The model's top guesses, most likely first")
    normalized_entropy: float
    hits: int
    lease_expires_at: datetime | None


class ClaimResponse(BaseModel):
    labeller: str
    lease_seconds: float
    tasks: list[TaskView]


LabellerName = Annotated[str, Field(min_length=1, max_length=100)]


class LabelRequest(BaseModel):
    label: str
    labeller: LabellerName = "anonymous"


class LabelResponse(BaseModel):
    task_id: str
    label: str
    outcome: LabelOutcome = Field(description="'recorded', or 'duplicate' for a repeated label")


class ReleaseRequest(BaseModel):
    labeller: LabellerName = "anonymous"


class ReleaseResponse(BaseModel):
    task_id: str
    released: bool


Labeller = Annotated[str, Parameter(min_length=1, max_length=100, description="Who claims")]
Limit = Annotated[int, Parameter(ge=1, le=MAX_CLAIM, description="How many tasks to claim")]


def _refusal(status: HTTPStatus, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def _queue(state: State) -> LabellingQueue:
    if "labelling_queue" not in state:
        settings = state.settings
        client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        lease = LabellingSettings().lease_seconds
        state.labelling_queue = LabellingQueue(client, settings.queue_prefix, lease_seconds=lease)
    return state.labelling_queue


@lru_cache(maxsize=64)
def _classes(model_dir: Path, name: str, version: int) -> tuple[str, ...]:
    # Versions are immutable, so the classes of one never change.
    return ModelRepository(model_dir).resolve(name, version).manifest.classes


def _classes_of(state: State, record: TaskRecord) -> tuple[str, ...]:
    return _classes(state.settings.model_dir, record.model_name, record.model_version)


def _checked_id(task_id: str) -> str:
    if not re.match(TASK_ID_PATTERN, task_id):
        raise _refusal(
            HTTPStatus.NOT_FOUND, f"no task {task_id[:80]!r}: task ids are 64 hex characters"
        )
    return task_id


def _existing_task(queue: LabellingQueue, task_id: str) -> Task:
    task = queue.task(_checked_id(task_id))
    if task is None:
        raise _refusal(
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
        classes=list(_classes_of(state, record)),
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
    task = _existing_task(queue, task_id)
    image = queue.image(task_id)
    if image is None:
        raise _refusal(
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
    task = _existing_task(queue, task_id)
    try:
        classes = _classes_of(state, task.record)
        outcome, label = queue.label(task_id, data.label, data.labeller, classes)
    except UnknownClassError as exc:
        raise _refusal(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
    if outcome is LabelOutcome.CONFLICT:
        raise _refusal(
            HTTPStatus.CONFLICT,
            f"task {task_id} is already labelled {label!r}; the first label stands",
        )
    if outcome is LabelOutcome.IMAGE_EXPIRED:
        raise _refusal(HTTPStatus.GONE, f"task {task_id}'s image expired; it cannot be labelled")
    if outcome is LabelOutcome.UNKNOWN_TASK:
        raise _refusal(HTTPStatus.NOT_FOUND, f"no task {task_id}: it was dropped or expired")
    return LabelResponse(task_id=task_id, label=data.label, outcome=outcome)


@post("/tasks/{task_id:str}/release", sync_to_thread=True, status_code=HTTPStatus.OK)
def release_task(queue: LabellingQueue, task_id: str, data: ReleaseRequest) -> ReleaseResponse:
    """Give a claimed task back to the queue before its lease ends."""
    if not queue.release(_checked_id(task_id), data.labeller):
        raise _refusal(
            HTTPStatus.CONFLICT,
            f"task {task_id} is not claimed by {data.labeller!r}; only its holder can release it",
        )
    return ReleaseResponse(task_id=task_id, released=True)


@get("/stats", sync_to_thread=True)
def queue_stats(queue: LabellingQueue) -> QueueStats:
    """How many tasks wait, are claimed and are labelled; how many were dropped or expired."""
    return queue.stats()


@get("/export/images.zip", sync_to_thread=True, media_type="application/zip")
def export_image_folder(queue: LabellingQueue) -> Response[bytes]:
    """Every labelled image as a zip of class folders: `<label>/<task id>.<ext>`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for record in LabelStore(queue.client, queue.prefix).all():
            archive.writestr(f"{record.label}/{_file_name(record)}", record.image)
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="labelled-images.zip"'},
    )


@get("/export/label-studio.json", sync_to_thread=True)
def export_label_studio(queue: LabellingQueue) -> list[dict]:
    """Every labelled image as Label Studio tasks (image inline as a data URI), with the
    label as an annotation and the model's top guess as a prediction."""
    return [_label_studio_task(r) for r in LabelStore(queue.client, queue.prefix).all()]


@get("/label", include_in_schema=False, media_type=MediaType.HTML, sync_to_thread=False)
def labelling_page() -> bytes:
    """The labelling page (plain HTML; it calls the routes above)."""
    return LABEL_PAGE.read_bytes()


def _file_name(record: LabelRecord) -> str:
    extension = mimetypes.guess_extension(record.task.content_type) or ".bin"
    return f"{record.task_id}{extension}"


def _choice(label: str) -> dict:
    # Matches a Label Studio config with <Image name="image"> and <Choices name="label">.
    return {
        "from_name": "label", "to_name": "image", "type": "choices",
        "value": {"choices": [label]},
    }


def _label_studio_task(record: LabelRecord) -> dict:
    image = base64.b64encode(record.image).decode()
    top = record.task.guesses[0] if record.task.guesses else None
    prediction = {
        "model_version": f"{record.task.model_name}:{record.task.model_version}",
        "score": top.probability if top else None,
        "result": [_choice(top.label)] if top else [],
    }
    return {
        "id": record.task_id,
        "data": {"image": f"data:{record.task.content_type};base64,{image}"},
        "annotations": [
            {"completed_by": record.labeller, "created_at": record.labelled_at.isoformat(),
             "result": [_choice(record.label)]}
        ],
        "predictions": [prediction],
    }


class QueueMetrics(Collector):
    """Prometheus metrics read from the queue at scrape time, so every replica reports the
    shared queue. Register once per process: `REGISTRY.register(QueueMetrics(queue))`."""

    def __init__(self, queue: LabellingQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.queue.stats()
        except redis.RedisError:
            return  # an outage shows as missing series, not as a failed scrape
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


def _redis_unavailable(_: Request, exc: redis.RedisError) -> Response[dict[str, object]]:
    return problem(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"the labelling queue's Redis is unavailable ({type(exc).__name__}); "
        "check that it runs and HALFLABEL_REDIS_URL points at it, then retry",
        {"Retry-After": "5"},
    )


_api = Router(
    "/v1/labelling",
    route_handlers=[
        claim_tasks, task_image, label_task, release_task, queue_stats,
        export_image_folder, export_label_studio,
    ],
    guards=[requires_scope("label")],
    dependencies={"queue": Provide(_queue, sync_to_thread=False)},
    exception_handlers={redis.RedisError: _redis_unavailable},
)

labelling_router = Router(
    "/",
    route_handlers=[
        _api,
        labelling_page,
        create_static_files_router("/label/static", [STATIC_DIR], include_in_schema=False),
    ],
)
