"""The training pipeline, top to bottom, and its public API.

    trained = run_pipeline(load_dataset("digits", labels_per_class=5), TrainConfig())
    artifact = export_and_publish(trained, ModelRepository(), "digits")
    print(evaluate_onnx(artifact, images, labels).accuracy)

Stages: backbone (ImageNet / checkpoint / SimCLR pretraining) → supervised fine-tuning →
label spreading + training on its pseudo-labels → FixMatch/FlexMatch refinement → temperature
scaling on a held-out slice of the labels. Each runs only when its budget is > 0.

Label spreading runs in rounds, each on the embeddings the previous one improved. A backbone
that starts untrained has learnt next to nothing from a handful of labels, so on small images
(digits, Fashion-MNIST) the first round spreads over the pixels instead: on digits with 7
labels (alpha 0.99, sim^3 edges) that gave 58% correct pseudo-labels against 44% over such
embeddings, and the network trained on them then yielded embeddings that spread better than
either (64%).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.calibration import (
    choose_entropy_threshold,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from trainer.config import TrainConfig
from trainer.data import Dataset, ImageSet
from trainer.errors import DataError
from trainer.fixmatch import UNUSED, FlexMatchThresholds, refine
from trainer.network import Architecture, Classifier, build_classifier
from trainer.optimise import predict
from trainer.runtime import Runtime, start_runtime
from trainer.simclr import pretrain
from trainer.spreading import EMBEDDING_GAMMA, PseudoLabels, spread_labels
from trainer.supervised import train_on_labels, train_on_pseudo_labels


@dataclass(frozen=True)
class StageResult:
    """What one stage did: its wall time and, when there is a test split, the accuracy after it."""

    name: str
    seconds: float
    test_accuracy: float | None
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling's outcome on the held-out labeled slice."""

    temperature: float
    entropy_threshold: float
    held_out: int
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
    runtime = runtime or start_runtime(config.device, config.seed, config.threads, config.progress)
    train, held_out = split_held_out(dataset.labeled, config.calibration_fraction, config.seed)
    weights = str(init_weights) if init_weights is not None else config.weights
    run = _Run(dataset, config, runtime, train, weights)
    if config.pretrain_steps and weights == "none":
        run.stage("simclr", run.pretrain)
    if config.supervised_steps:
        run.stage("supervised", run.fine_tune)
    if config.spreading and config.pseudo_steps:
        run.stage("label-spreading", run.spread_and_train)
    if config.refine_steps:
        run.stage("fixmatch", run.refine)
    calibration = calibrate(run.classifier, held_out, dataset.test, config, runtime)
    pseudo_labelled = len(run.pool) if run.pseudo is not None or config.refine_steps else 0
    return TrainedModel(run.classifier, dataset, config, held_out, calibration, run.results,
                        runtime, pseudo_labelled)


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


class _Run:
    """The state the stages share: tensors on the device and the classifier being trained."""

    def __init__(self, dataset: Dataset, config: TrainConfig, runtime: Runtime,
                 train: ImageSet, weights: str) -> None:
        self.dataset, self.config, self.runtime = dataset, config, runtime
        architecture = Architecture(
            backbone=config.backbone, num_classes=len(dataset.classes),
            in_channels=dataset.spec.channels,
            image_size=min(dataset.spec.height, dataset.spec.width),
        )
        device = runtime.device
        self.classifier = build_classifier(architecture, weights).to(device)
        self.images = torch.as_tensor(train.images, device=device)
        self.labels = torch.as_tensor(train.labels, device=device)
        self.pool = torch.as_tensor(dataset.unlabeled, device=device)
        self.untrained = weights == "none" and not config.pretrain_steps
        self.results: list[StageResult] = []
        self.pseudo: PseudoLabels | None = None

    def stage(self, name: str, body: Callable[[], dict[str, float] | None]) -> None:
        """Run one stage, timing it and measuring test accuracy after it (for the report only)."""
        started = time.perf_counter()
        details = body() or {}
        test = self.dataset.test
        accuracy = self.accuracy(test) if test is not None and len(test) else None
        self.results.append(StageResult(name, time.perf_counter() - started, accuracy, details))

    def accuracy(self, images: ImageSet) -> float:
        inputs = torch.as_tensor(images.images, device=self.runtime.device)
        logits = predict(self.classifier, inputs, self.runtime)
        return float(np.mean(logits.argmax(axis=1) == images.labels))

    def require_pool(self, stage: str) -> None:
        if len(self.pool) == 0:
            raise DataError(f"{stage} needs unlabeled images but the pool is empty; add some "
                            f"(DIR/unlabeled/) or switch the stage off")

    def pretrain(self) -> dict[str, float]:
        self.require_pool("SimCLR pretraining")
        everything = torch.cat([self.images, self.pool])
        return pretrain(self.classifier.backbone, self.classifier.feature_dim, everything,
                        self.config, self.runtime)

    def fine_tune(self) -> None:
        train_on_labels(self.classifier, self.images, self.labels, self.config.supervised_steps,
                        self.config, self.runtime)

    def spread_and_train(self) -> dict[str, float]:
        """Spread labels on the current embeddings, train on them; again with the better ones."""
        self.require_pool("label spreading (--no-spreading to skip)")
        rounds = self.config.spreading_rounds
        steps = [self.config.pseudo_steps // rounds + (i < self.config.pseudo_steps % rounds)
                 for i in range(rounds)]
        details: dict[str, float] = {}
        for index, round_steps in enumerate(steps, start=1):
            on_inputs = index == 1 and self.first_spreading_on_inputs()
            found = self.spread_and_train_once(on_inputs, round_steps,
                                               f"pseudo-labels {index}/{rounds}")
            details.update({f"round{index}_{key}": value for key, value in found.items()})
        return details

    def first_spreading_on_inputs(self) -> bool:
        space = self.config.first_spreading_space
        if space == "auto":
            return self.untrained and self.classifier.architecture.cifar_stem
        return space == "inputs"

    def spreading_features(self, on_inputs: bool) -> tuple[np.ndarray, np.ndarray]:
        """Features of the labeled images and of the pool: centred pixels, or embeddings."""
        if on_inputs:
            pixels = torch.cat([self.images, self.pool]).flatten(1).cpu().numpy()
            pixels = pixels - pixels.mean(axis=0)  # cosine similarity of centred pixels
            return pixels[: len(self.images)], pixels[len(self.images):]
        embed = self.classifier.embed
        return predict(embed, self.images, self.runtime), predict(embed, self.pool, self.runtime)

    def spread_and_train_once(self, on_inputs: bool, steps: int,
                              description: str) -> dict[str, float]:
        labeled, pool = self.spreading_features(on_inputs)
        config = self.config
        pseudo = spread_labels(
            labeled, self.labels.cpu().numpy(), pool, len(self.dataset.classes),
            config.spreading_neighbors, config.spreading_alpha,
            config.pixel_spreading_gamma if on_inputs else EMBEDDING_GAMMA,
            config.unreached_prior,
        )
        device = self.runtime.device
        train_on_pseudo_labels(
            self.classifier, self.images, self.labels, self.pool,
            torch.as_tensor(pseudo.targets, device=device),
            torch.as_tensor(pseudo.weights, device=device),
            steps, self.config, self.runtime, description,
        )
        self.pseudo = pseudo
        details = {"mean_confidence": float(pseudo.confidence.mean()),
                   "spread_on_inputs": float(on_inputs)}
        if self.dataset.unlabeled_truth is not None:
            details["pseudo_label_accuracy"] = float(
                np.mean(pseudo.labels == self.dataset.unlabeled_truth))
        return details

    def refine(self) -> dict[str, float]:
        self.require_pool("FixMatch refinement (--refine-steps 0 to skip)")
        classes, tau = len(self.dataset.classes), self.config.confidence_threshold
        seeds = np.full(len(self.pool), UNUSED) if self.pseudo is None else self.pseudo.labels
        thresholds = FlexMatchThresholds(seeds, classes, tau)
        return refine(self.classifier, self.images, self.labels, self.pool, thresholds,
                      self.config, self.runtime)


def calibrate(classifier: Classifier, held_out: ImageSet, test: ImageSet | None,
              config: TrainConfig, runtime: Runtime) -> Calibration:
    """Fit the temperature on `held_out`, set it on `classifier`, and pick the entropy threshold."""
    def logits_of(images: ImageSet) -> np.ndarray:
        return predict(classifier, torch.as_tensor(images.images, device=runtime.device), runtime)

    if len(held_out) == 0:
        # Nothing held out: no temperature, and queue by a fixed rule instead.
        return Calibration(temperature=1.0, entropy_threshold=0.5, held_out=0)
    held_logits = logits_of(held_out)
    temperature = fit_temperature(held_logits, held_out.labels)
    classifier.set_temperature(temperature)
    before, after = softmax(held_logits), softmax(held_logits, temperature)
    test_ece: tuple[float | None, float | None] = (None, None)
    if test is not None and len(test):
        test_logits = logits_of(test)
        test_ece = (expected_calibration_error(softmax(test_logits), test.labels),
                    expected_calibration_error(softmax(test_logits, temperature), test.labels))
    return Calibration(
        temperature=temperature,
        entropy_threshold=choose_entropy_threshold(
            after, held_out.labels, config.target_confident_accuracy, config.min_queue_fraction),
        held_out=len(held_out),
        ece_before=expected_calibration_error(before, held_out.labels),
        ece_after=expected_calibration_error(after, held_out.labels),
        test_ece_before=test_ece[0],
        test_ece_after=test_ece[1],
    )
