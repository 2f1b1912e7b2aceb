"""The training pipeline, top to bottom, and its public API.

    trained = run_pipeline(load_dataset("digits", labels_per_class=5), TrainConfig())
    artifact = export_and_publish(trained, ModelRepository("models/store"), "digits")
    print(evaluate_onnx(artifact, images, labels).accuracy)

The recipe is a list of stages (`recipe`), run in order over one shared `TrainingState`: a
backbone from ImageNet / a checkpoint / SimCLR pretraining → supervised fine-tuning → label
spreading rounds, each followed by training on its pseudo-labels → FixMatch/FlexMatch
refinement. Each runs only when its budget (`steps`) is > 0, and each from the first
spreading round on is kept only if it does not lower a held-out criterion (`trainer.criterion`).
Temperature scaling on a held-out slice of the labels then calibrates what they trained.

Label spreading runs in rounds, each on the embeddings the previous one improved. A backbone
that starts untrained has learnt next to nothing from a handful of labels, so on small images
(digits, Fashion-MNIST) the first round spreads over the pixels instead: on digits with 7
labels (alpha 0.99, sim^3 edges) that gave 58% correct pseudo-labels against 44% over such
embeddings, and the network trained on them then yielded embeddings that spread better than
either (64%).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trainer.budget import plan
from trainer.calibration import (
    ThresholdCheck,
    check_threshold,
    expected_calibration_error,
    fit_temperature,
    queue_threshold,
    softmax,
)
from trainer.config import TrainConfig
from trainer.criterion import Criterion, Snapshot, judge
from trainer.data import Dataset, ImageSet
from trainer.fixmatch import FixMatchRefinement
from trainer.network import Architecture, Classifier, build_classifier, choose_backbone
from trainer.optimise import predict
from trainer.runtime import Runtime, start_runtime
from trainer.simclr import SimCLRPretraining
from trainer.spreading import LabelSpreadingRound
from trainer.stage import Stage, StageResult, TrainingState
from trainer.supervised import SupervisedFineTuning

log = logging.getLogger(__name__)


def recipe(config: TrainConfig) -> list[Stage]:
    """The stages, in the order they run."""
    rounds = config.spreading.rounds
    return [
        SimCLRPretraining(),
        SupervisedFineTuning(),
        *(LabelSpreadingRound(index, rounds) for index in range(1, rounds + 1)),
        FixMatchRefinement(),
    ]


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling's outcome on the held-out labeled slice, and the entropy threshold
    that queues `queue_share` of the `threshold_from` images (the unlabeled pool)."""

    temperature: float
    entropy_threshold: float
    queue_share: float
    threshold_from: str
    held_out: int
    check: ThresholdCheck | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    test_ece_before: float | None = None
    test_ece_after: float | None = None


@dataclass
class TrainedModel:
    """A trained, calibrated classifier and everything needed to publish and report it."""

    classifier: Classifier
    dataset: Dataset
    config: TrainConfig
    held_out: ImageSet
    calibration: Calibration
    stages: list[StageResult]
    runtime: Runtime
    pseudo_labelled: int = 0

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)


def run_pipeline(
    dataset: Dataset, config: TrainConfig, init_weights: Path | None = None,
    runtime: Runtime | None = None,
) -> TrainedModel:
    """Train a calibrated classifier on `dataset`; `init_weights` (a weights.pt) to fine-tune."""
    if init_weights is not None:
        config = config.model_copy(update={"weights": str(init_weights)})
    runtime = runtime or start_runtime(config.device, config.seed, config.threads, config.progress)
    train, held_out = split_held_out(dataset.labeled, config.calibration.fraction, config.seed)
    state = _start(dataset, config, runtime, train)
    stages = recipe(config)
    if config.budget is not None:
        state.config = config = runtime.agree(plan(stages, state, config.budget).config)
    results = run_stages(stages, state, held_out)
    calibration = calibrate(state.classifier, held_out, dataset, config, runtime)
    pseudo_labelled = len(state.pool) if state.pseudo is not None or config.refine.steps else 0
    return TrainedModel(state.classifier, dataset, config, held_out, calibration, results,
                        runtime, pseudo_labelled)


def run_stages(stages: list[Stage], state: TrainingState, held_out: ImageSet) -> list[StageResult]:
    """Run each stage that has a budget; once the pool has pseudo-labels, judge each on the
    held-out criterion of the latest spreading round and roll back those that lower it
    (`trainer.criterion`)."""
    results: list[StageResult] = []
    criterion: Criterion | None = None
    for stage in stages:
        if not (steps := stage.steps(state.config)):
            continue
        before = Snapshot.of(state)
        result = run_stage(stage, state, steps)
        if state.pseudo is not None and state.pseudo is not before.pseudo:
            criterion = Criterion.anchored(held_out, state)
        if criterion is not None and state.config.rollback:
            verdict = judge(criterion, before, state)
            log.info("%s %s: %s", stage.name, "kept" if verdict.kept else "rolled back",
                     verdict.reason)
            result = replace(result, verdict=verdict)
        results.append(result)
    return results


def run_stage(stage: Stage, state: TrainingState, steps: int) -> StageResult:
    """Run one stage, timing it and measuring test accuracy after it (for the report only)."""
    started = time.perf_counter()
    details = stage.run(state, steps)
    test = state.dataset.test
    accuracy = state.accuracy(test) if test is not None and len(test) else None
    return StageResult(stage.name, steps, time.perf_counter() - started, accuracy, details)


def _start(dataset: Dataset, config: TrainConfig, runtime: Runtime,
           train: ImageSet) -> TrainingState:
    device = runtime.device
    image_size = min(dataset.spec.height, dataset.spec.width)
    architecture = Architecture(
        backbone=choose_backbone(config.backbone, config.weights, image_size, device),
        num_classes=len(dataset.classes), in_channels=dataset.spec.channels,
        image_size=image_size,
    )
    return TrainingState(
        dataset, config, runtime, build_classifier(architecture, config.weights).to(device),
        images=torch.as_tensor(train.images, device=device),
        labels=torch.as_tensor(train.labels, device=device),
        pool=torch.as_tensor(dataset.unlabeled, device=device),
    )


def split_held_out(labeled: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Keep `fraction` of each class's labels for calibration, rounded down, and never so many
    that the class keeps fewer than two to train on. Few labels are worth more as training
    seeds than as calibration: in the digits active-learning loop (simulated over the spreading
    engine), holding out one of a class's three labels cost 10 points of spreading accuracy at
    one round, and a handful of held-out images calibrates nothing anyway."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in np.unique(labeled.labels):
        members = np.flatnonzero(labeled.labels == label)
        count = max(0, min(math.floor(round(fraction * len(members), 6)), len(members) - 2))
        held.extend(rng.choice(members, size=count, replace=False))
    mask = np.zeros(len(labeled), dtype=bool)
    mask[np.asarray(held, dtype=np.int64)] = True
    return (ImageSet(labeled.images[~mask], labeled.labels[~mask]),
            ImageSet(labeled.images[mask], labeled.labels[mask]))


def calibrate(classifier: Classifier, held_out: ImageSet, dataset: Dataset,
              config: TrainConfig, runtime: Runtime) -> Calibration:
    """Fit the temperature on `held_out` and set it on `classifier`, pick the entropy threshold
    that queues `queue_share` of the unlabeled pool, and check it on `held_out`."""
    def logits_of(images: np.ndarray) -> np.ndarray:
        return predict(classifier, torch.as_tensor(images, device=runtime.device), runtime)

    held_logits = logits_of(held_out.images) if len(held_out) else None
    temperature = 1.0 if held_logits is None else fit_temperature(held_logits, held_out.labels)
    classifier.set_temperature(temperature)
    source, images = _threshold_reference(dataset, held_out)
    reference = softmax(logits_of(images), temperature)
    share = config.calibration.queue_share
    calibration = Calibration(temperature, queue_threshold(reference, share), share, source,
                              len(held_out))
    if held_logits is None:  # nothing held out: no temperature, nothing to check against
        return calibration
    before, after = softmax(held_logits), softmax(held_logits, temperature)
    test_ece: tuple[float | None, float | None] = (None, None)
    if dataset.test is not None and len(dataset.test):
        test_logits, test_labels = logits_of(dataset.test.images), dataset.test.labels
        test_ece = (expected_calibration_error(softmax(test_logits), test_labels),
                    expected_calibration_error(softmax(test_logits, temperature), test_labels))
    return replace(
        calibration,
        check=check_threshold(after, held_out.labels, calibration.entropy_threshold, reference),
        ece_before=expected_calibration_error(before, held_out.labels),
        ece_after=expected_calibration_error(after, held_out.labels),
        test_ece_before=test_ece[0],
        test_ece_after=test_ece[1],
    )


def _threshold_reference(dataset: Dataset, held_out: ImageSet) -> tuple[str, np.ndarray]:
    """The images whose entropies set the threshold: the unlabeled pool, the inputs most like
    what the service will see; without a pool, the held-out labels, else every label (which the
    network trained on, so they look surer than new inputs and more of those get queued)."""
    candidates = (("pool", dataset.unlabeled), ("held-out labels", held_out.images),
                  ("labeled images", dataset.labeled.images))
    return next((name, images) for name, images in candidates if len(images))
