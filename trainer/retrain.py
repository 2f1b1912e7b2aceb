"""Retraining: learn from the labels people gave, publish only if not worse.

1. Snapshot: the label store's unacknowledged labels are added to a new, numbered snapshot on
   disk (`<snapshot-dir>/<queue prefix>/snapshot-NNNN.jsonl` listing every label so far, images
   in `images/` named by their sha256), and only then acknowledged in Redis.
2. Data: the original labeled data of the current version (same source, budget and seed) plus
   the snapshot's labels for this model; labelled images leave the unlabeled pool.
3. Fine-tune from the current version's weights.pt, export, and evaluate candidate and current
   with ONNX Runtime on the same held-out test split.
4. Publish the candidate, once, only if its accuracy >= current accuracy - margin (or with
   force). The running service picks the new version up by polling the repository.

`halflabel-train retrain` (trainer.cli) is the command line over `retrain`.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from models.labels import LabelRecord, LabelStore
from models.manifest import Manifest
from models.preprocessing import preprocess
from models.repository import Artifact, ModelRepository
from trainer.config import TrainConfig
from trainer.data import Dataset, ImageSet, load_dataset
from trainer.errors import DataError
from trainer.pipeline import run_pipeline
from trainer.publish import Evaluation, evaluate_onnx, exported


class SnapshotItem(BaseModel):
    """One label in a snapshot."""

    task_id: str
    label: str
    labeller: str
    labelled_at: datetime
    model_name: str
    model_version: int
    image: str = Field(description="Image file, relative to the snapshot directory")


@dataclass(frozen=True)
class Snapshot:
    """A numbered, immutable list of every label taken from the store so far."""

    directory: Path
    version: int
    items: tuple[SnapshotItem, ...]

    @property
    def path(self) -> Path:
        return self.directory / f"snapshot-{self.version:04d}.jsonl"


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain did: the accuracies compared, and the version published (None if not)."""

    snapshot: Snapshot
    feedback: int
    current: Evaluation
    candidate: Evaluation
    published: Artifact | None


def latest_snapshot(directory: Path) -> Snapshot:
    """The newest snapshot in `directory` (version 0, empty, when there is none)."""
    versions = sorted(int(p.stem.split("-")[1]) for p in directory.glob("snapshot-*.jsonl"))
    if not versions:
        return Snapshot(directory, 0, ())
    snapshot = Snapshot(directory, versions[-1], ())
    lines = snapshot.path.read_text().splitlines()
    return replace(snapshot, items=tuple(SnapshotItem.model_validate_json(line) for line in lines))


def take_snapshot(store: LabelStore, directory: Path) -> Snapshot:
    """Write the store's unacknowledged labels into a new snapshot, then acknowledge them.

    Returns the latest snapshot unchanged when there is nothing new. A crash before the
    acknowledgement only means the same labels are read again, and recognised as known.
    """
    directory.mkdir(parents=True, exist_ok=True)
    previous = latest_snapshot(directory)
    records = store.unacknowledged()
    known = {item.task_id for item in previous.items}
    fresh = {record.task_id: record for record in records if record.task_id not in known}
    new = [_save_image(record, directory) for record in fresh.values()]
    snapshot = previous
    if new:
        snapshot = Snapshot(directory, previous.version + 1, previous.items + tuple(new))
        lines = "".join(item.model_dump_json() + "\n" for item in snapshot.items)
        _write_atomically(snapshot.path, lines)
    store.acknowledge(records)
    return snapshot


def with_feedback(base: Dataset, snapshot: Snapshot, name: str) -> tuple[Dataset, int]:
    """`base` plus the snapshot's labels of model `name`; returns it and how many were added."""
    index = {label: i for i, label in enumerate(base.classes)}
    usable = [i for i in snapshot.items if i.model_name == name and i.label in index]
    if not usable:
        return base, 0
    images = np.stack(
        [preprocess((snapshot.directory / i.image).read_bytes(), base.spec) for i in usable]
    )
    labels = np.array([index[i.label] for i in usable], dtype=base.labeled.labels.dtype)
    labelled_now = set(map(_array_digest, images))
    still_unlabeled = np.array([_array_digest(a) not in labelled_now for a in base.unlabeled])
    truth = base.unlabeled_truth
    dataset = replace(
        base,
        labeled=ImageSet(np.concatenate([base.labeled.images, images]),
                         np.concatenate([base.labeled.labels, labels])),
        unlabeled=base.unlabeled[still_unlabeled],
        unlabeled_truth=truth[still_unlabeled] if truth is not None else None,
    )
    return dataset, len(usable)


def original_data(
    current: Manifest,
    *,
    data: str | None = None,
    labels_per_class: int | None = None,
    labeled_fraction: float | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Dataset:
    """The data `current` was first trained on (same source, budget and seed), in its input spec."""
    return load_dataset(data or current.training.data, labels_per_class=labels_per_class,
                        labeled_fraction=labeled_fraction,
                        seed=current.training.seed if seed is None else seed,
                        spec=current.input, progress=progress)


def inherit(config: TrainConfig, parent: Manifest) -> TrainConfig:
    """`config` with the parent's backbone, seed and queue share where neither a flag nor the
    environment set them: its weights fit only its backbone, its split follows its seed, and
    its share of inputs to queue is the operator's choice, not the trainer's."""
    inherited = {"backbone": parent.training.backbone, "seed": parent.training.seed}
    config = config.model_copy(update={key: value for key, value in inherited.items()
                                       if key not in config.model_fields_set})
    calibration = config.calibration
    if parent.queue_share is None or "queue_share" in calibration.model_fields_set:
        return config
    return config.model_copy(update={
        "calibration": calibration.model_copy(update={"queue_share": parent.queue_share})})


def retrain(
    name: str,
    repository: ModelRepository,
    store: LabelStore,
    snapshot_dir: Path,
    config: TrainConfig,
    base: Dataset,
    *,
    margin: float = 0.0,
    force: bool = False,
) -> RetrainResult:
    """Snapshot the new labels, fine-tune the current version of `name` on `base` plus every
    snapshot label, and publish the candidate if it is not worse on `base`'s test split."""
    current = repository.resolve(name)
    if base.classes != current.manifest.classes:
        raise DataError(f"{base.source} has classes {', '.join(base.classes)} but {name} predicts "
                        f"{', '.join(current.manifest.classes)}; pass the data it was trained on")
    test = base.test
    if test is None or not len(test):
        raise DataError(f"{base.source} has no test split to compare candidate and current on; "
                        "add DIR/test/<class>/ images")
    snapshot = take_snapshot(store, snapshot_dir)
    dataset, feedback = with_feedback(base, snapshot, name)
    if not feedback and not force:
        raise DataError(f"no labels for {name!r} in the label store or {snapshot_dir}; "
                        "label some first, or pass --force to retrain anyway")
    trained = run_pipeline(dataset, config, init_weights=current.path / "weights.pt")
    with exported(trained, parent_version=current.manifest.version, feedback=feedback,
                  feedback_snapshot=snapshot.path if feedback else None) as candidate:
        # The candidate was evaluated on the test split as it was exported; the same for current.
        now = evaluate_onnx(current, test.images, test.labels)
        promote = force or candidate.evaluation.accuracy >= now.accuracy - margin
        published = candidate.publish(repository, name) if promote else None
    return RetrainResult(snapshot, feedback, now, candidate.evaluation, published)


def _save_image(record: LabelRecord, directory: Path) -> SnapshotItem:
    extension = mimetypes.guess_extension(record.task.content_type) or ".bin"
    relative = f"images/{record.task_id}{extension}"
    path = directory / relative
    if not path.exists():  # named by content: an existing file is already this image
        path.parent.mkdir(exist_ok=True)
        _write_atomically(path, record.image)
    return SnapshotItem(
        task_id=record.task_id, label=record.label, labeller=record.labeller,
        labelled_at=record.labelled_at, model_name=record.task.model_name,
        model_version=record.task.model_version, image=relative,
    )


def _write_atomically(path: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()

