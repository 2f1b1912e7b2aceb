"""Exports of the label store and the queue, and Label Studio's labels back in.

`images.zip` is an image folder (`<label>/<task id>.<ext>`). The Label Studio routes serve its
labelling config, the labelled tasks (as annotations), the waiting tasks (with the model's guess
as a pre-annotation), and take Label Studio's JSON export back into the label store.
"""

from __future__ import annotations

import io
import mimetypes
import zipfile
from collections import Counter
from http import HTTPStatus
from typing import Annotated, Any

from litestar import MediaType, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import Parameter

from models.labels import LabelRecord, LabelStore
from models.queue import DEFAULT_MAX_TASKS, LabellingQueue, TaskStatus
from service.labelling import label_studio
from service.labelling.label_studio import ExportedTask, ImportedAnnotation, LabelStudioFormatError
from service.labelling.schemas import ImportedLabel, ImportResponse
from service.labelling.tasks import classes_of, refusal

PendingLimit = Annotated[
    int, Parameter(ge=1, le=DEFAULT_MAX_TASKS, description="How many tasks, most uncertain first")
]


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


def _file_name(record: LabelRecord) -> str:
    extension = mimetypes.guess_extension(record.task.content_type) or ".bin"
    return f"{record.task_id}{extension}"


@get("/export/label-studio-config.xml", sync_to_thread=False, media_type=MediaType.XML)
def export_label_studio_config(state: State) -> str:
    """The Label Studio labelling config for the served model's classes."""
    return label_studio.labelling_config(state.model_host.current.manifest.classes)


@get("/export/label-studio.json", sync_to_thread=True)
def export_label_studio(queue: LabellingQueue) -> list[dict[str, Any]]:
    """Every labelled image as a Label Studio task, its label as an annotation."""
    return [label_studio.labelled_task(r) for r in LabelStore(queue.client, queue.prefix).all()]


@get("/export/label-studio-pending.json", sync_to_thread=True)
def export_label_studio_pending(
    queue: LabellingQueue, limit: PendingLimit = 1000
) -> list[dict[str, Any]]:
    """The waiting tasks, most uncertain first, as Label Studio tasks with the model's guess as a
    pre-annotation. Nothing is claimed: a task labelled here meanwhile keeps its first label."""
    return [label_studio.pending_task(t.record, image) for t, image in queue.pending(limit)]


@post("/import/label-studio", sync_to_thread=True, status_code=HTTPStatus.OK)
def import_label_studio(
    state: State, queue: LabellingQueue, data: list[ExportedTask]
) -> ImportResponse:
    """Label Studio's JSON export of tasks exported by halflabel, into the label store.

    Importing the same export again changes nothing. Every task is checked before any label is
    written: a task halflabel does not know or a label that is not a class refuses the whole
    import."""
    try:
        annotations = [found for task in data if (found := label_studio.annotation_of(task))]
    except LabelStudioFormatError as exc:
        raise _refused(str(exc)) from None
    checked = [(a, _classes_if_importable(state, queue, a)) for a in annotations]
    labels = [
        ImportedLabel(
            task_id=a.task_id,
            label=a.label,
            outcome=queue.label(a.task_id, a.label, a.labeller, classes)[0],
        )
        for a, classes in checked
    ]
    return ImportResponse(
        outcomes=Counter(label.outcome for label in labels),
        unannotated=len(data) - len(annotations),
        labels=labels,
    )


def _classes_if_importable(
    state: State, queue: LabellingQueue, annotation: ImportedAnnotation
) -> tuple[str, ...]:
    """The classes the annotation's task accepts; a 422 if it cannot take the label."""
    task_id = annotation.task_id
    task = queue.task(task_id)
    if task is None:
        raise _refused(
            f"no task {task_id} in the queue: it was never queued here, or dropped or expired"
        )
    classes = classes_of(state, task.record)
    if annotation.label not in classes:
        raise _refused(
            f"task {task_id}: label {annotation.label!r} is not a class of its model; use one "
            f"of: {', '.join(classes)}"
        )
    if task.status is not TaskStatus.LABELLED and queue.image(task_id) is None:
        raise _refused(f"task {task_id}'s image expired; it cannot be labelled")
    return classes


def _refused(reason: str) -> HTTPException:
    return refusal(HTTPStatus.UNPROCESSABLE_ENTITY, f"{reason}; nothing was imported")


EXPORT_ROUTES = [
    export_image_folder, export_label_studio_config, export_label_studio,
    export_label_studio_pending, import_label_studio,
]
