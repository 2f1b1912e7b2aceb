"""Shapes of the `/v1` API's JSON requests and responses."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field


class Instance(BaseModel):
    """One image in a JSON request."""

    b64: str = Field(description="The image file's bytes, base64-encoded")


class PredictRequest(BaseModel):
    """JSON alternative to a raw or multipart image body."""

    instances: list[Instance] = Field(min_length=1)


@dataclass(frozen=True)
class ClassProbability:
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """What the model says about one input."""

    label: str
    class_index: int
    confidence: float
    probabilities: list[ClassProbability]
    entropy: float
    normalized_entropy: float
    queued_for_labelling: bool
    input_sha256: str


@dataclass(frozen=True)
class PredictResponse:
    """Predictions in the order the inputs were sent, and the model version that made them."""

    name: str
    version: int
    predictions: list[Prediction]
