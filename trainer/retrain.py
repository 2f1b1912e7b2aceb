"""`halflabel-train retrain`: learn from the labels people gave, publish only if not worse.

1. Snapshot: the label store's unacknowledged labels are added to a new, numbered snapshot on
   disk (`<snapshot-dir>/<queue prefix>/snapshot-NNNN.jsonl` listing every label so far, images
   in `images/` named by their sha256), and only then acknowledged in Redis.
2. Data: the original labeled data of the current version (same source, budget and seed) plus
   the snapshot's labels for this model; labelled images leave the unlabeled pool.
3. Fine-tune from the current version's weights.pt, export, and evaluate candidate and current
   with ONNX Runtime on the same held-out test split.
4. Publish only if candidate accuracy >= current accuracy - margin (or --force). The running
   service picks the new version up by polling the repository.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import redis
import typer
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console

from models.errors import HalflabelError
from models.labels import LabelRecord, LabelStore
from models.manifest import Manifest, ManifestDraft
from models.preprocessing import preprocess
from models.queue import DEFAULT_PREFIX
from models.repository import (
    FP16_MODEL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    Artifact,
    ModelRepository,
    default_root,
)
from trainer.config import Device, TrainConfig
from trainer.errors import DataError

if TYPE_CHECKING:
    from trainer.data import Dataset
    from trainer.publish import Evaluation

FEEDBACK_MARK = " + feedback "  # joins the original source and the snapshot in manifest `data`


class RetrainSettings(BaseSettings):
    """Where the labels come from and the promotion gate: `HALFLABEL_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_prefix: str = DEFAULT_PREFIX
    snapshot_dir: Path = Path("data/feedback")
    retrain_margin: float = Field(
        0.0, ge=-1, le=1, description="Publish if candidate >= current accuracy - margin"
    )


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
    from trainer.data import ImageSet

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
        source=f"{base.source}{FEEDBACK_MARK}{snapshot.path}",
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
    from trainer.data import load_dataset

    source = data or current.training.data.split(FEEDBACK_MARK)[0]
    return load_dataset(source, labels_per_class=labels_per_class,
                        labeled_fraction=labeled_fraction,
                        seed=current.training.seed if seed is None else seed,
                        spec=current.input, progress=progress)


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
    from trainer.pipeline import run_pipeline
    from trainer.publish import evaluate_onnx, export_and_publish

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
    with tempfile.TemporaryDirectory(prefix="halflabel-candidate-") as scratch:
        # Staged in a scratch repository (as its version 1) so it can be measured first.
        candidate = export_and_publish(trained, ModelRepository(scratch), name,
                                       feedback_count=feedback)
        scores = [evaluate_onnx(a, test.images, test.labels) for a in (current, candidate)]
        promote = force or scores[1].accuracy >= scores[0].accuracy - margin
        published = (_publish_copy(candidate, repository, current.manifest.version)
                     if promote else None)
    return RetrainResult(snapshot, feedback, scores[0], scores[1], published)


def retrain_command(
    name: Annotated[str, typer.Option(help="model to retrain; its latest version is the parent")],
    data: Annotated[str | None, typer.Option(
        help="original data [default: the parent's]")] = None,
    labels_per_class: Annotated[int | None, typer.Option(
        min=1, help="original label budget, as given to fit [default: fit's]")] = None,
    labeled_fraction: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    margin: Annotated[float | None, typer.Option(
        min=-1, max=1, help="publish if candidate >= current accuracy - margin "
        "[env HALFLABEL_RETRAIN_MARGIN, default 0]")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="publish even if worse; retrain even without new labels")] = False,
    redis_url: Annotated[str | None, typer.Option(help="[env HALFLABEL_REDIS_URL]")] = None,
    queue_prefix: Annotated[str | None, typer.Option(help="[env HALFLABEL_QUEUE_PREFIX]")] = None,
    snapshot_dir: Annotated[Path | None, typer.Option(
        help="label snapshots root [env HALFLABEL_SNAPSHOT_DIR, default data/feedback]")] = None,
    model_dir: Annotated[Path | None, typer.Option(
        envvar="HALFLABEL_MODEL_DIR", help="model repository root [default: models/store]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the original split")] = None,
    supervised_steps: Annotated[int | None, typer.Option(min=0)] = None,
    pseudo_steps: Annotated[int | None, typer.Option(min=0)] = None,
    spreading: Annotated[bool | None, typer.Option("--spreading/--no-spreading")] = None,
    device: Annotated[Device | None, typer.Option(help="auto, cpu or cuda")] = None,
    threads: Annotated[int | None, typer.Option(min=0, help="CPU threads (0: all)")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress")] = None,
) -> None:
    """Fine-tune NAME on the new labels and publish it only if it is not worse."""
    from trainer.cli import console, user_errors  # here: trainer.cli imports this module

    flags = {key: value for key, value in locals().items()
             if key in TrainConfig.model_fields and value is not None}
    overrides = {"redis_url": redis_url, "queue_prefix": queue_prefix,
                 "snapshot_dir": snapshot_dir, "retrain_margin": margin}
    with user_errors():
        settings = _settings(**{k: v for k, v in overrides.items() if v is not None})
        repository = ModelRepository(model_dir or default_root())
        parent = repository.resolve(name).manifest
        config = TrainConfig(**{"backbone": parent.training.backbone, "seed": parent.training.seed,
                                **flags})
        base = original_data(parent, data=data, labels_per_class=labels_per_class,
                             labeled_fraction=labeled_fraction, seed=config.seed,
                             progress=config.progress)
        store = LabelStore(redis.Redis.from_url(settings.redis_url), settings.queue_prefix)
        try:
            result = retrain(name, repository, store, settings.snapshot_dir / settings.queue_prefix,
                             config, base, margin=settings.retrain_margin, force=force)
        except redis.RedisError as exc:
            raise DataError(f"cannot read labels from Redis at {settings.redis_url}: {exc}; "
                            "check HALFLABEL_REDIS_URL (--redis-url)") from None
    _report(console, name, parent.version, result, settings.retrain_margin)


def _report(console: Console, name: str, parent: int, result: RetrainResult,
            margin: float) -> None:
    console.print(f"snapshot {result.snapshot.path} ({len(result.snapshot.items)} labels); "
           f"{result.feedback} used for {name}")
    console.print(f"held-out accuracy: current {name}:{parent} {result.current.accuracy:.2%}, "
           f"candidate {result.candidate.accuracy:.2%} on {result.candidate.n} images")
    if result.published is None:
        console.print(f"kept {name}:{parent}: the candidate is worse by more than the margin "
               f"({margin:.2%}); --force publishes anyway")
    else:
        published = result.published
        console.print(f"published {name}:{published.manifest.version} to {published.path}")


def _settings(**overrides: object) -> RetrainSettings:
    try:
        return RetrainSettings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise HalflabelError(f"bad retrain setting: {exc}".splitlines()[0]) from None


def _publish_copy(staged: Artifact, repository: ModelRepository, parent: int) -> Artifact:
    """Publish a staged candidate's files and manifest as the next version, child of `parent`."""
    fields = staged.manifest.model_dump(include=set(ManifestDraft.model_fields))
    draft = ManifestDraft.model_validate({**fields, "parent_version": parent})
    onnx_files = {MODEL_FILE, FP16_MODEL_FILE, MANIFEST_FILE}
    extra = {p.name: p for p in staged.path.iterdir() if p.name not in onnx_files}
    return repository.publish(staged.manifest.name, staged.onnx_path, draft,
                              fp16_onnx_file=staged.fp16_onnx_path, extra_files=extra)


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

