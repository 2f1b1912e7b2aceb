"""The pipeline's stages on a tiny budget: they run, they are reproducible, bad input is named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.repository import ModelRepository
from trainer import pipeline
from trainer.config import TrainConfig
from trainer.criterion import surest
from trainer.data import Dataset, ImageSet, load_dataset
from trainer.errors import DataError, ExportError, WeightsError
from trainer.export import check_parity, export_onnx
from trainer.network import (
    Architecture,
    ProbabilitiesAndEntropy,
    build_classifier,
    choose_backbone,
    classifier_from_checkpoint,
    save_checkpoint,
    trained_image_size,
)
from trainer.optimise import predict
from trainer.pipeline import calibrate, run_pipeline
from trainer.publish import export_and_publish
from trainer.spreading import LabelSpreadingRound, PseudoLabels
from trainer.stage import TrainingState
from trainer.supervised import SupervisedFineTuning

TINY: dict[str, Any] = {"threads": 1, "progress": False, "batch_size": 8,
                        "supervised": {"steps": 3}, "pseudo": {"steps": 3}, "refine": {"steps": 0}}
NO_SPREADING = {"spreading": {"enabled": False}}


def tiny(**changes: Any) -> TrainConfig:
    """The tiny budget with `changes`, a section's fields merged into the budget's."""
    merged = {**TINY}
    for key, value in changes.items():
        merged[key] = {**TINY[key], **value} if key in TINY and isinstance(value, dict) else value
    return TrainConfig(**merged)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", labels_per_class=5, progress=False)


def state_digest(module: torch.nn.Module) -> list[np.ndarray]:
    return [tensor.detach().cpu().numpy().copy() for tensor in module.state_dict().values()]


@pytest.mark.slow
def test_every_stage_runs_and_is_reported(digits: Dataset) -> None:
    trained = run_pipeline(digits, tiny(pretrain={"steps": 2}, refine={"steps": 2}))
    assert trained.stage_names == ("simclr", "supervised", "label-spreading-1",
                                   "label-spreading-2", "fixmatch")
    assert [stage.steps for stage in trained.stages] == [2, 3, 2, 1, 2]
    assert all(stage.test_accuracy is not None for stage in trained.stages)
    for spreading in trained.stages[2:4]:
        assert 0 <= spreading.details["pseudo_label_accuracy"] <= 1
    assert "mask_rate_last_100" in trained.stages[4].details
    assert trained.calibration.held_out == 10 and trained.calibration.temperature > 0
    assert trained.pseudo_labelled == len(digits.unlabeled)


@pytest.mark.slow
def test_same_seed_same_model_on_cpu(digits: Dataset) -> None:
    config = tiny(refine={"steps": 2})
    first, second = run_pipeline(digits, config), run_pipeline(digits, config)
    for a, b in zip(state_digest(first.classifier), state_digest(second.classifier), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [s.test_accuracy for s in first.stages] == [s.test_accuracy for s in second.stages]
    other = run_pipeline(digits, tiny(seed=1, refine={"steps": 2}))
    assert any(not np.array_equal(a, b) for a, b in
               zip(state_digest(first.classifier), state_digest(other.classifier), strict=True))


def test_stages_that_need_unlabeled_images_name_the_empty_pool(digits: Dataset) -> None:
    empty = replace(digits, unlabeled=digits.unlabeled[:0], unlabeled_truth=None)
    with pytest.raises(DataError, match="label spreading .* pool is empty"):
        run_pipeline(empty, tiny())
    with pytest.raises(DataError, match="FixMatch .* pool is empty"):
        run_pipeline(empty, tiny(refine={"steps": 1}, **NO_SPREADING))
    supervised_only = run_pipeline(empty, tiny(**NO_SPREADING))
    assert supervised_only.stage_names == ("supervised",)
    # No pool to take the threshold from: the held-out labels' entropies stand in for it.
    assert supervised_only.calibration.threshold_from == "held-out labels"


def pool_queued_share(classifier: torch.nn.Module, pool: np.ndarray, threshold: float) -> float:
    """The share of `pool` the exported graph's entropy puts above `threshold`."""
    with torch.no_grad():
        _, entropy = ProbabilitiesAndEntropy(classifier)(torch.as_tensor(pool))
    return float(np.mean(entropy.numpy() / np.log(10) > threshold))


@pytest.mark.slow
def test_the_threshold_queues_the_pool_share_whatever_the_held_out_labels(
    digits: Dataset,
) -> None:
    # A network that learnt something (about 67% right on the test split), so that right and
    # wrong held-out labels tell apart.
    trained = run_pipeline(digits, tiny(supervised={"steps": 40}, learning_rate=0.01,
                                        calibration={"queue_share": 0.2}, **NO_SPREADING))
    held_out = trained.held_out
    wrong = replace(held_out, labels=(held_out.labels + 1) % 10)
    nothing = ImageSet(held_out.images[:0], held_out.labels[:0])
    checks = []
    for labels in (held_out, wrong, nothing):
        calibration = calibrate(trained.classifier, labels, digits, trained.config,
                                trained.runtime)
        assert calibration.threshold_from == "pool" and calibration.queue_share == 0.2
        queued = pool_queued_share(trained.classifier, digits.unlabeled,
                                   calibration.entropy_threshold)
        assert abs(queued - 0.2) < 0.005, labels
        checks.append(calibration.check)
    right, wrong_check, none = checks
    assert right is not None and wrong_check is not None and none is None
    assert right.unqueued_accuracy > wrong_check.unqueued_accuracy  # type: ignore[operator]


@pytest.mark.slow
def test_parity_failure_refuses_to_publish(digits: Dataset, tmp_path: Path) -> None:
    trained = run_pipeline(digits, tiny(**NO_SPREADING))
    onnx_path = export_onnx(trained.classifier, digits.spec, tmp_path / "model.onnx")
    images = np.ascontiguousarray(digits.labeled.images[:8])
    assert check_parity(onnx_path, trained.classifier, images) <= 1e-4
    with torch.no_grad():
        # The PyTorch model drifts to outputs no input can saturate: softmax(arange / T).
        trained.classifier.head.weight.zero_()
        trained.classifier.head.bias.copy_(torch.arange(10.0))
    with pytest.raises(ExportError, match="nothing was published"):
        check_parity(onnx_path, trained.classifier, images)


@pytest.mark.slow
def test_fp16_variant_is_published_and_agrees_with_fp32(digits: Dataset, tmp_path: Path) -> None:
    trained = run_pipeline(digits, tiny(fp16=True, **NO_SPREADING))
    repository = ModelRepository(tmp_path / "store")
    artifact = export_and_publish(trained, repository, "digits16")
    assert artifact.fp16_onnx_path is not None
    assert repository.resolve("digits16").manifest.fp16_onnx_sha256
    images = np.ascontiguousarray(digits.test.images[:16])  # type: ignore[union-attr]
    outputs = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["probabilities"], {"image": images})[0]
        for path in (artifact.onnx_path, artifact.fp16_onnx_path)
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-2)


def test_published_weights_restore_the_head_and_other_checkpoints_only_the_backbone(
    tmp_path: Path,
) -> None:
    architecture = Architecture(backbone="resnet18", num_classes=10, in_channels=1, image_size=8)
    source = build_classifier(architecture)
    source.set_temperature(2.5)
    save_checkpoint(source, tmp_path / "weights.pt")
    same = build_classifier(architecture, str(tmp_path / "weights.pt"))
    torch.testing.assert_close(same.head.weight, source.head.weight)
    torch.testing.assert_close(same.backbone.conv1.weight, source.backbone.conv1.weight)
    assert float(same.temperature) == 1.0
    fewer_classes = architecture.model_copy(update={"num_classes": 3})
    other = build_classifier(fewer_classes, str(tmp_path / "weights.pt"))
    torch.testing.assert_close(other.backbone.layer4[1].conv2.weight,
                               source.backbone.layer4[1].conv2.weight)
    assert other.head.weight.shape == (3, 512)


def test_missing_imagenet_weights_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    architecture = Architecture(backbone="resnet18", num_classes=10, in_channels=3, image_size=32)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError, match=f"put it at {expected}"):
        build_classifier(architecture, "imagenet")
    with pytest.raises(WeightsError, match="not found"):
        build_classifier(architecture, str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsError, match="no ImageNet weights for resnet20"):
        build_classifier(architecture.model_copy(update={"backbone": "resnet20"}), "imagenet")


def test_narrow_resnet_trains_exports_and_rebuilds_from_its_checkpoint(
    digits: Dataset, tmp_path: Path
) -> None:
    trained = run_pipeline(digits, tiny(backbone="resnet20", **NO_SPREADING))
    classifier = trained.classifier.eval()
    assert classifier.architecture.backbone == "resnet20" and classifier.feature_dim == 64
    untrained = build_classifier(classifier.architecture)
    assert not torch.equal(untrained.head.weight, classifier.head.weight)
    onnx_path = export_onnx(classifier, digits.spec, tmp_path / "model.onnx")
    images = np.ascontiguousarray(digits.labeled.images[:8])
    assert check_parity(onnx_path, classifier, images) <= 1e-4
    save_checkpoint(classifier, tmp_path / "weights.pt")
    rebuilt = classifier_from_checkpoint(tmp_path / "weights.pt").eval()
    with torch.no_grad():
        for ours, theirs in zip(ProbabilitiesAndEntropy(rebuilt)(torch.as_tensor(images)),
                                ProbabilitiesAndEntropy(classifier)(torch.as_tensor(images)),
                                strict=True):
            torch.testing.assert_close(ours, theirs)
    assert trained_image_size(str(tmp_path / "weights.pt")) == 8


def test_auto_backbone_is_narrow_only_for_small_images_from_scratch_on_a_cpu(
    tmp_path: Path,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backbone("auto", "none", 8, cpu) == "resnet20"
    assert choose_backbone("auto", "none", 224, cpu) == "resnet18"
    assert choose_backbone("auto", "none", 8, cuda) == "resnet18"
    assert choose_backbone("auto", "imagenet", 8, cpu) == "resnet18"
    assert choose_backbone("resnet34", "none", 8, cpu) == "resnet34"
    architecture = Architecture(backbone="resnet50", num_classes=2, in_channels=3, image_size=32)
    save_checkpoint(build_classifier(architecture), tmp_path / "weights.pt")
    assert choose_backbone("auto", str(tmp_path / "weights.pt"), 8, cpu) == "resnet50"


def test_untrained_backbone_spreads_first_over_pixels(digits: Dataset) -> None:
    rounds = run_pipeline(digits, tiny()).stages[1:3]
    assert [r.details["spread_on_inputs"] for r in rounds] == [1, 0]
    # 3 supervised steps teach the backbone nothing; the pixels of digits already cluster.
    pixels_first = rounds[0].details["pseudo_label_accuracy"]
    assert pixels_first > 0.8
    embeddings = run_pipeline(digits, tiny(spreading={"first_space": "embeddings"}))
    details = embeddings.stages[1].details
    assert details["spread_on_inputs"] == 0
    assert details["pseudo_label_accuracy"] < pixels_first - 0.05


class Wreck:
    """A stage that ruins the classifier: every input gets class 0."""

    name = "wreck"

    def steps(self, config: TrainConfig) -> int:
        return 1

    def run(self, state: TrainingState, steps: int) -> dict[str, float]:
        head = state.classifier.head
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.eye(len(head.bias))[0] * 10)
        state.pseudo = None
        return {}


class Pause:
    """A stage that changes nothing: the criterion ties, and a tie keeps it."""

    name = "pause"

    def steps(self, config: TrainConfig) -> int:
        return 1

    def run(self, state: TrainingState, steps: int) -> dict[str, float]:
        return {}


@pytest.mark.parametrize("rollback", [True, False])
def test_a_stage_that_lowers_the_criterion_is_rolled_back(
    digits: Dataset, monkeypatch: pytest.MonkeyPatch, rollback: bool
) -> None:
    stages = [SupervisedFineTuning(), LabelSpreadingRound(1, 1), Wreck(), Pause()]
    monkeypatch.setattr(pipeline, "recipe", lambda config: stages)
    trained = run_pipeline(digits, tiny(rollback=rollback))
    spread, wreck, pause = trained.stages[1:]
    assert digits.test is not None
    final = predict(trained.classifier, torch.as_tensor(digits.test.images), trained.runtime)
    final_accuracy = float(np.mean(final.argmax(axis=1) == digits.test.labels))
    assert wreck.test_accuracy is not None and wreck.test_accuracy < 0.15
    if rollback:
        assert wreck.verdict is not None and not wreck.kept
        assert wreck.verdict.score < wreck.verdict.before
        assert " < " in wreck.verdict.reason and "held-out labels" in wreck.verdict.reason
        assert pause.kept and pause.verdict is not None
        assert pause.verdict.score == pause.verdict.before
        # The wreck undone: the model is the one the spreading round left, pseudo-labels too.
        assert final_accuracy == spread.test_accuracy
        assert trained.pseudo_labelled == len(digits.unlabeled)
    else:
        assert all(stage.verdict is None for stage in trained.stages)
        assert final_accuracy == wreck.test_accuracy


def test_the_criterion_is_the_surest_half_of_each_spread_class() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    confidence = np.array([0.1, 0.9, 0.5, 0.8, 0.3, 0.2])
    pseudo = PseudoLabels(np.eye(2)[labels], labels, confidence, np.ones(6))
    assert surest(pseudo, np.random.default_rng(0)).tolist() == [1, 3, 4]


def test_poisson_learning_spreads_below_two_labels_per_class(digits: Dataset) -> None:
    one_each = load_dataset("digits", labels_per_class=1, progress=False)
    rounds = [s for s in run_pipeline(one_each, tiny()).stages if s.name.startswith("label")]
    assert [r.details["poisson"] for r in rounds] == [1, 1]
    assert rounds[0].details["pseudo_label_accuracy"] > 0.6
    chosen = run_pipeline(digits, tiny(spreading={"method": "poisson"})).stages[1].details
    assert chosen["poisson"] == 1
    assert run_pipeline(digits, tiny()).stages[1].details["poisson"] == 0
