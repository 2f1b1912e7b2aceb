"""The manifest: everything the service needs to serve a published model correctly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_SCHEMA_VERSION: Literal[1] = 1
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How raw images become the model's input tensor."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    color_mode: Literal["L", "RGB"]
    mean: tuple[float, ...] = Field(description="Per-channel mean of pixels scaled to 0..1")
    std: tuple[float, ...] = Field(description="Per-channel std, applied after the mean")
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"
    input_name: str = "image"

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if (self.color_mode == "L") != (self.channels == 1):
            raise ValueError(f"color_mode {self.color_mode} does not fit {self.channels} channels")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class OutputSpec(_Strict):
    """Names of the ONNX outputs."""

    probabilities: str = "probabilities"
    entropy: str = "entropy"


class Metrics(_Strict):
    """Held-out metrics of the published model."""

    accuracy: float = Field(ge=0, le=1)
    n_test: int = Field(ge=0)
    split: str = Field(description="Which data the metrics were computed on, e.g. 'digits:test'")
    ece: float | None = Field(default=None, ge=0, le=1)
    extra: dict[str, float] = Field(default_factory=dict)


class TrainingSummary(_Strict):
    """What the model was trained from, so a version can be reproduced."""

    labelled: int = Field(ge=0, description="Labeled images, feedback labels included")
    pseudo_labelled: int = Field(ge=0)
    feedback: int = Field(default=0, ge=0, description="Labels from the labelling queue")
    feedback_snapshot: str | None = Field(
        default=None, description="The label snapshot the feedback labels come from, e.g. "
        "'data/feedback/halflabel/snapshot-0002.jsonl'; None without feedback")
    data: str = Field(description="Original data source, e.g. 'digits' or a folder path")
    data_fingerprint: str = Field(description="sha256 over the training inputs and labels")
    seed: int
    backbone: str
    stages: tuple[str, ...] = ()


class ManifestDraft(_Strict):
    """What the trainer knows about a model before the repository gives it a name and version."""

    classes: tuple[str, ...] = Field(min_length=2)
    input: InputSpec
    outputs: OutputSpec = OutputSpec()
    opset: int = Field(ge=7)
    metrics: Metrics
    entropy_threshold: float = Field(
        ge=0, le=1, description="Normalized entropy above which an input is queued for labelling"
    )
    queue_share: float | None = Field(
        default=None, gt=0, lt=1, description="The trainer's target share of inputs to queue: "
        "entropy_threshold is the (1 - share) quantile of the normalized entropies of its "
        "unlabeled pool. None in manifests from before it was recorded")
    training: TrainingSummary
    parent_version: int | None = Field(default=None, ge=1)


class Manifest(ManifestDraft):
    """The contract between trainer and service, stored as `manifest.json` beside `model.onnx`."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    fp16_onnx_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _parent_is_older(self) -> Manifest:
        if self.parent_version is not None and self.parent_version >= self.version:
            raise ValueError("parent_version must be older than version")
        return self
