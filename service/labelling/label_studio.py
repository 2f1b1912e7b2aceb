"""The Label Studio format: the labelling config, tasks to import into it, and its JSON export.

A task carries its image inline as a data URI and halflabel's task id as
`data.halflabel_task_id` (Label Studio renumbers tasks but keeps `data` as it is, through its
JSON export and back). Labels are `choices` results from `<Choices name="label">` on
`<Image name="image">`, the config `labelling_config` writes. Annotations carry no `completed_by`,
so Label Studio assigns them to the user who imports them (it refuses ids and emails it does not
know); the model's top guess is a prediction, shown as a pre-annotation.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree

from pydantic import BaseModel, ConfigDict, Field

from models.labels import LabelRecord
from models.queue import TASK_ID_PATTERN, TaskRecord

TASK_ID_KEY = "halflabel_task_id"
FROM_NAME, TO_NAME = "label", "image"


class LabelStudioFormatError(ValueError):
    """A Label Studio task halflabel cannot read a label from."""


def labelling_config(classes: Sequence[str]) -> str:
    """The Label Studio labelling config (XML) for a model with these classes."""
    view = ElementTree.Element("View")
    ElementTree.SubElement(view, "Image", name=TO_NAME, value=f"${TO_NAME}")
    choices = ElementTree.SubElement(
        view, "Choices", name=FROM_NAME, toName=TO_NAME, choice="single", showInline="true"
    )
    for name in classes:
        ElementTree.SubElement(choices, "Choice", value=name)
    ElementTree.indent(view)
    return ElementTree.tostring(view, encoding="unicode") + "\n"


def _choice(label: str) -> dict[str, Any]:
    return {
        "from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
        "value": {"choices": [label]},
    }


def pending_task(record: TaskRecord, image: bytes) -> dict[str, Any]:
    """A task to label in Label Studio, the model's top guess as its pre-annotation."""
    data = {
        TO_NAME: f"data:{record.content_type};base64,{base64.b64encode(image).decode()}",
        TASK_ID_KEY: record.id,
    }
    task: dict[str, Any] = {"data": data, "predictions": []}
    if record.guesses:
        top = record.guesses[0]
        task["predictions"].append({
            "model_version": f"{record.model_name}:{record.model_version}",
            "score": top.probability,
            "result": [_choice(top.label)],
        })
    return task


def labelled_task(record: LabelRecord) -> dict[str, Any]:
    """A task labelled in halflabel, its label as an annotation."""
    task = pending_task(record.task, record.image)
    task["annotations"] = [
        {"result": [_choice(record.label)], "created_at": record.labelled_at.isoformat()}
    ]
    return task


# What halflabel reads of Label Studio's JSON export; everything else in it is ignored.
class _Result(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    from_name: str | None = None
    value: dict[str, Any] = Field(default_factory=dict)


class _Annotation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    result: list[_Result] = Field(default_factory=list)
    was_cancelled: bool = False
    ground_truth: bool = False
    completed_by: int | str | dict[str, Any] | None = None


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")

    halflabel_task_id: str | None = Field(default=None, pattern=TASK_ID_PATTERN)


class ExportedTask(BaseModel):
    """One task of Label Studio's JSON export ('JSON' in its Export dialog or API)."""

    model_config = ConfigDict(extra="ignore")

    id: int | None = Field(default=None, description="Label Studio's own task id")
    data: _Data
    annotations: list[_Annotation] = Field(default_factory=list)


class ImportedAnnotation(BaseModel):
    """The label Label Studio's export holds for one halflabel task."""

    task_id: str
    label: str
    labeller: str


def annotation_of(task: ExportedTask) -> ImportedAnnotation | None:
    """The task's label: its ground-truth annotation if one is marked, else its latest one;
    skipped (cancelled) and empty annotations do not count. None when no annotation counts."""
    where = f"Label Studio task {task.id}" if task.id is not None else "a Label Studio task"
    if task.data.halflabel_task_id is None:
        raise LabelStudioFormatError(
            f"{where} has no data.{TASK_ID_KEY}: only tasks exported by halflabel can come back"
        )
    usable = [
        (annotation, label)
        for annotation in task.annotations
        if not annotation.was_cancelled and (label := _label(annotation, where)) is not None
    ]
    if not usable:
        return None
    annotation, label = ([pair for pair in usable if pair[0].ground_truth] or usable)[-1]
    return ImportedAnnotation(
        task_id=task.data.halflabel_task_id, label=label, labeller=_labeller(annotation)
    )


def _label(annotation: _Annotation, where: str) -> str | None:
    picked = [
        r.value.get("choices") for r in annotation.result
        if r.type == "choices" and r.from_name == FROM_NAME
    ]
    match picked:
        case []:
            return None
        case [[str(label)]]:
            return label
    raise LabelStudioFormatError(
        f"{where}: an annotation must choose exactly one '{FROM_NAME}'; use the labelling config "
        "from /v1/labelling/export/label-studio-config.xml"
    )


def _labeller(annotation: _Annotation) -> str:
    who = annotation.completed_by
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return "label-studio" if who is None else f"label-studio:{who}"[:100]
