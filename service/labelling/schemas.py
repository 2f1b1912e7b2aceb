"""Request and response bodies of the labelling routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from models.queue import Guess, LabelOutcome

LabellerName = Annotated[str, Field(min_length=1, max_length=100)]


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


class ImportedLabel(BaseModel):
    """What an import did with one task's label."""

    task_id: str
    label: str
    outcome: LabelOutcome = Field(
        description="'recorded'; 'duplicate' when the task already had this label; 'conflict' "
        "when it already had another one (the first label stands)"
    )


class ImportResponse(BaseModel):
    outcomes: dict[LabelOutcome, int] = Field(description="How many labels had each outcome")
    unannotated: int = Field(description="Tasks with no usable annotation, left as they were")
    labels: list[ImportedLabel]
