"""Export a trained model, check it, and publish it with its report; evaluate published models."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.manifest import ManifestDraft, Metrics, TrainingSummary
from models.repository import Artifact, ModelRepository
from trainer.calibration import expected_calibration_error, normalized_entropy, softmax
from trainer.data import ImageSet
from trainer.export import (
    OPSET,
    OUTPUTS,
    PARITY_BATCH,
    check_parity,
    convert_to_fp16,
    export_onnx,
)
from trainer.network import save_checkpoint
from trainer.optimise import PREDICT_BATCH
from trainer.pipeline import TrainedModel
from trainer.report import (
    plot_confusion_matrix,
    plot_reliability,
    plot_stage_accuracy,
    write_report,
)


@dataclass(frozen=True)
class Evaluation:
    """Metrics of a published model, computed with ONNX Runtime on its exported file."""

    accuracy: float
    ece: float
    n: int
    queued_fraction: float
    predicted: np.ndarray
    probabilities: np.ndarray

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "ece": self.ece, "n": self.n,
                "queued_fraction": self.queued_fraction}


def evaluate_onnx(artifact: Artifact, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Run the artifact's model.onnx on `images` (preprocessed) and score it against `labels`."""
    manifest = artifact.manifest
    return evaluate_onnx_file(artifact.onnx_path, manifest.input.input_name,
                              manifest.entropy_threshold, images, labels)


def evaluate_onnx_file(onnx_path: Path, input_name: str, entropy_threshold: float,
                       images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """evaluate_onnx for a file not (yet) in a repository."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probabilities = np.concatenate([
        session.run([OUTPUTS.probabilities], {input_name: images[i:i + PREDICT_BATCH]})[0]
        for i in range(0, len(images), PREDICT_BATCH)
    ])
    predicted = probabilities.argmax(axis=1)
    return Evaluation(
        accuracy=float(np.mean(predicted == labels)),
        ece=expected_calibration_error(probabilities, labels),
        n=len(labels),
        queued_fraction=float(np.mean(normalized_entropy(probabilities) > entropy_threshold)),
        predicted=predicted,
        probabilities=probabilities,
    )


@dataclass(frozen=True)
class ExportedModel:
    """A trained model exported to ONNX, checked and evaluated in a work folder: what will be
    published, already measured."""

    onnx_path: Path
    fp16_onnx_path: Path | None
    draft: ManifestDraft
    evaluation: Evaluation
    files: dict[str, Path]

    def publish(self, repository: ModelRepository, name: str) -> Artifact:
        """Publish it as the next version of `name`."""
        return repository.publish(name, self.onnx_path, self.draft,
                                  fp16_onnx_file=self.fp16_onnx_path, extra_files=self.files)


@contextmanager
def exported(
    trained: TrainedModel, *, parent_version: int | None = None, feedback: int = 0,
    feedback_snapshot: Path | None = None,
) -> Iterator[ExportedModel]:
    """Export to ONNX (refusing on a parity failure) and evaluate it, in a folder that lasts
    as long as the context.

    The manifest's metrics come from ONNX Runtime on the exported file: on the test split when
    there is one, else on the held-out labeled slice.
    """
    evaluation_set, split = _evaluation_set(trained)
    with tempfile.TemporaryDirectory(prefix="halflabel-export-") as scratch:
        work = Path(scratch)
        onnx_path = export_onnx(trained.classifier, trained.dataset.spec, work / "model.onnx")
        parity = check_parity(onnx_path, trained.classifier,
                              _parity_batch(trained, evaluation_set))
        fp16_path = convert_to_fp16(onnx_path, work / "model.fp16.onnx") if (
            trained.config.fp16) else None
        save_checkpoint(trained.classifier, work / "weights.pt")
        evaluation = evaluate_onnx_file(
            onnx_path, trained.dataset.spec.input_name, trained.calibration.entropy_threshold,
            evaluation_set.images, evaluation_set.labels)
        metrics = Metrics(
            accuracy=evaluation.accuracy, n_test=evaluation.n, split=split, ece=evaluation.ece,
            extra={"parity_max_abs_diff": parity, "queued_fraction": evaluation.queued_fraction},
        )
        training = _training_summary(trained, feedback, feedback_snapshot)
        files = _report_files(trained, evaluation_set, evaluation, parity, work)
        yield ExportedModel(
            onnx_path, fp16_path, _draft(trained, metrics, training, parent_version), evaluation,
            {**files, "weights.pt": work / "weights.pt"},
        )


def export_and_publish(
    trained: TrainedModel, repository: ModelRepository, name: str,
    parent_version: int | None = None,
) -> Artifact:
    """Export, check and publish `trained` as the next version of `name`."""
    with exported(trained, parent_version=parent_version) as model:
        return model.publish(repository, name)


def _evaluation_set(trained: TrainedModel) -> tuple[ImageSet, str]:
    test = trained.dataset.test
    if test is not None and len(test):
        return test, f"{trained.dataset.source}:test"
    return trained.held_out, f"{trained.dataset.source}:held-out-labels"


def _parity_batch(trained: TrainedModel, evaluation_set: ImageSet) -> np.ndarray:
    images = evaluation_set.images if len(evaluation_set) else trained.dataset.labeled.images
    return np.ascontiguousarray(images[:PARITY_BATCH])


def _training_summary(trained: TrainedModel, feedback: int,
                      feedback_snapshot: Path | None) -> TrainingSummary:
    dataset, config = trained.dataset, trained.config
    return TrainingSummary(
        labelled=len(dataset.labeled), pseudo_labelled=trained.pseudo_labelled,
        feedback=feedback,
        feedback_snapshot=str(feedback_snapshot) if feedback_snapshot is not None else None,
        data=dataset.source, data_fingerprint=dataset.fingerprint(), seed=config.seed,
        backbone=trained.classifier.architecture.backbone, stages=trained.stage_names,
    )


def _draft(trained: TrainedModel, metrics: Metrics, training: TrainingSummary,
           parent_version: int | None) -> ManifestDraft:
    return ManifestDraft(
        classes=trained.dataset.classes,
        input=trained.dataset.spec,
        opset=OPSET,
        metrics=metrics,
        entropy_threshold=trained.calibration.entropy_threshold,
        queue_share=trained.calibration.queue_share,
        training=training,
        parent_version=parent_version,
    )


def _report_files(trained: TrainedModel, evaluation_set: ImageSet, evaluation: Evaluation,
                  parity: float, work: Path) -> dict[str, Path]:
    calibration = trained.calibration
    report = {
        "data": trained.dataset.source,
        "classes": trained.dataset.classes,
        "labeled": len(trained.dataset.labeled),
        "held_out_for_calibration": calibration.held_out,
        "unlabeled": len(trained.dataset.unlabeled),
        "skipped_images": list(trained.dataset.skipped),
        "config": trained.config.model_dump(),
        "stages": [asdict(stage) for stage in trained.stages],
        "calibration": asdict(calibration),
        "evaluation": evaluation.summary(),
        "onnx_parity_max_abs_diff": parity,
        "processes": trained.runtime.world_size,
        "device": str(trained.runtime.device),
    }
    files = {"report.json": write_report(work / "report.json", report)}
    labels = evaluation_set.labels
    files["confusion_matrix.png"] = plot_confusion_matrix(
        work / "confusion_matrix.png", labels, evaluation.predicted, trained.dataset.classes)
    uncalibrated = softmax(np.log(np.clip(evaluation.probabilities, 1e-12, 1)),
                           1 / calibration.temperature)
    files["reliability.png"] = plot_reliability(
        work / "reliability.png", labels, uncalibrated, evaluation.probabilities)
    stage_accuracy = [(s.name, s.test_accuracy) for s in trained.stages
                      if s.test_accuracy is not None]
    if stage_accuracy:
        files["accuracy_by_stage.png"] = plot_stage_accuracy(
            work / "accuracy_by_stage.png", stage_accuracy + [("published", evaluation.accuracy)])
    return files
