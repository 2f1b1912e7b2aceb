"""What a pipeline stage is, and the state the stages share.

A stage has a name, a budget under the config (its training steps; 0 skips it), and runs on
the shared `TrainingState`, returning the figures it reports. A new method is a module with
one such class, plus its entry in `trainer.pipeline.recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.data import Dataset, ImageSet
from trainer.errors import DataError
from trainer.network import Classifier
from trainer.optimise import predict
from trainer.runtime import Runtime

if TYPE_CHECKING:
    from trainer.spreading import PseudoLabels


@dataclass
class TrainingState:
    """What the stages share: the training data on the device, the classifier being trained,
    and the latest pseudo-labels of the unlabeled pool."""

    dataset: Dataset
    config: TrainConfig
    runtime: Runtime
    classifier: Classifier
    images: torch.Tensor
    labels: torch.Tensor
    pool: torch.Tensor
    pseudo: PseudoLabels | None = None

    @property
    def untrained(self) -> bool:
        """Whether the backbone started from random weights, with no pretraining."""
        return self.config.weights == "none" and not self.config.pretrain.steps

    def require_pool(self, stage: str) -> None:
        if len(self.pool) == 0:
            raise DataError(f"{stage} needs unlabeled images but the pool is empty; add some "
                            f"(DIR/unlabeled/) or switch the stage off")

    def accuracy(self, images: ImageSet) -> float:
        inputs = torch.as_tensor(images.images, device=self.runtime.device)
        logits = predict(self.classifier, inputs, self.runtime)
        return float(np.mean(logits.argmax(axis=1) == images.labels))

SETUP_SECONDS = "setup_seconds"


class Stage(Protocol):
    """One step of the recipe."""

    @property
    def name(self) -> str:
        """How the report and the manifest's `training.stages` call it."""
        ...

    def steps(self, config: TrainConfig) -> int:
        """Its budget under `config`: training steps, 0 when it does not run."""
        ...

    def run(self, state: TrainingState, steps: int) -> dict[str, float]:
        """Train `state` for `steps`; returns the figures to report, `SETUP_SECONDS` among them
        where the stage has large fixed work before its steps (trainer.budget plans with it)."""
        ...


@dataclass(frozen=True)
class Verdict:
    """The held-out criterion after a stage and before it (`trainer.criterion`), and whether
    the stage was kept or rolled back."""

    score: float
    before: float
    kept: bool
    reason: str


@dataclass(frozen=True)
class StageResult:
    """What one stage did: its wall time, the verdict on it once there is a criterion, and,
    when there is a test split, the accuracy after it (for the report only: no stage ever sees
    the test split; a rolled-back stage's is the accuracy it would have left)."""

    name: str
    steps: int
    seconds: float
    test_accuracy: float | None
    details: dict[str, float] = field(default_factory=dict)
    verdict: Verdict | None = None

    @property
    def kept(self) -> bool:
        return self.verdict is None or self.verdict.kept
