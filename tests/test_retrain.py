"""Retraining from the label store: snapshot, promotion gate, and the live service's pickup."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from conftest import REDIS_URL, start_service, stop_service
from PIL import Image

from models.labels import LabelStore
from models.queue import Guess, LabellingQueue, TaskRecord
from models.repository import Artifact, ModelRepository
from trainer.config import TrainConfig
from trainer.retrain import (
    inherit,
    latest_snapshot,
    original_data,
    retrain,
    take_snapshot,
)

TINY_TRAINING = {"supervised": {"steps": 10}, "pseudo": {"steps": 0},
                 "spreading": {"enabled": False}, "threads": 1, "progress": False,
                 "batch_size": 16}
LABELS_PER_CLASS = 3


def digit_pngs(count: int) -> list[tuple[bytes, str]]:
    """Digits from the end of scikit-learn's set, as the PNG files a client would send."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images[-count:] * (255 / 16)).astype(np.uint8)
    pngs = []
    for image, target in zip(pixels, digits.target[-count:], strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append((buffer.getvalue(), str(target)))
    return pngs


def label_directly(prefix: str, pngs: list[tuple[bytes, str]]) -> None:
    """Queue and label digits through the queue's Python client, as a direct consumer would."""
    queue = LabellingQueue.from_url(REDIS_URL, prefix)
    classes = [str(d) for d in range(10)]
    for png, truth in pngs:
        task_id = hashlib.sha256(png).hexdigest()
        guesses = [Guess(label="0", probability=0.1)]
        queue.push(TaskRecord(id=task_id, content_type="image/png", model_name="digits",
                              model_version=1, guesses=guesses, entropy=2.3,
                              normalized_entropy=1.0), png)
        queue.label(task_id, truth, "oracle", classes)


@pytest.fixture(scope="module")
def trained_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with digits:1, trained for a few steps (built once, copied per test)."""
    from trainer.data import load_dataset
    from trainer.pipeline import run_pipeline
    from trainer.publish import export_and_publish

    root = tmp_path_factory.mktemp("trained") / "store"
    dataset = load_dataset("digits", labels_per_class=LABELS_PER_CLASS, progress=False)
    trained = run_pipeline(dataset, TrainConfig(**TINY_TRAINING))
    export_and_publish(trained, ModelRepository(root), "digits")
    return root


@pytest.fixture
def repo(trained_repo: Path, tmp_path: Path) -> ModelRepository:
    return ModelRepository(shutil.copytree(trained_repo, tmp_path / "store"))


def scratch(directory: Path) -> Path:
    """A temp folder of the test's own, to prove retrain leaves nothing there."""
    path = directory / "tmp"
    path.mkdir(exist_ok=True)
    return path


def run_retrain(repo: ModelRepository, prefix: str, snapshots: Path, *flags: str
                ) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trainer", "retrain", "--name", "digits",
               "--labels-per-class", str(LABELS_PER_CLASS), "--supervised-steps", "10",
               "--pseudo-steps", "0", "--refine-steps", "0", "--no-spreading", "--threads", "1",
               "--no-progress",
               "--model-dir", str(repo.root), "--snapshot-dir", str(snapshots), *flags]
    env = {**os.environ, "HALFLABEL_REDIS_URL": REDIS_URL, "HALFLABEL_QUEUE_PREFIX": prefix,
           "TMPDIR": str(scratch(snapshots.parent))}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
def test_retrain_publishes_and_the_live_service_serves_it(
    repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    service = start_service(
        {"HALFLABEL_MODEL_DIR": str(repo.root), "HALFLABEL_MODEL_NAME": "digits",
         "HALFLABEL_QUEUE_PREFIX": queue_prefix, "HALFLABEL_POLL_INTERVAL_S": "0.5"},
        tmp_path / "service.log",
    )
    try:
        with service.client() as client:
            queued = 0
            for png, _ in digit_pngs(12):
                answer = client.post("/v1/predict", content=png,
                                     headers={"Content-Type": "image/png"}).json()
                queued += answer["predictions"][0]["queued_for_labelling"]
            assert queued > 0, "an undertrained model should be unsure of some digits"
            truth = {hashlib.sha256(png).hexdigest(): label for png, label in digit_pngs(12)}
            deadline = time.monotonic() + 10
            while client.get("/v1/labelling/stats").json()["pending"] < queued:
                assert time.monotonic() < deadline, "predictions never reached the queue"
                time.sleep(0.1)
            tasks = client.get("/v1/labelling/tasks", params={"limit": 50}).json()["tasks"]
            for task in tasks:
                client.post(f"/v1/labelling/tasks/{task['id']}/label",
                            json={"label": truth[task["id"]], "labeller": "oracle"})

            result = run_retrain(repo, queue_prefix, tmp_path / "snapshots", "--margin", "1")
            assert result.returncode == 0, result.stderr
            assert "published digits:2" in result.stdout
            # No candidate repository or export folder left behind (libraries may leave theirs).
            assert [p for p in scratch(tmp_path).iterdir() if p.name.startswith("halflabel-")
                    ] == []

            deadline = time.monotonic() + 20
            while client.post("/v1/predict", content=digit_pngs(1)[0][0],
                              headers={"Content-Type": "image/png"}).json()["version"] != 2:
                assert time.monotonic() < deadline, "the service never picked up version 2"
                time.sleep(0.25)
    finally:
        stop_service(service)

    manifest = repo.resolve("digits", 2).manifest
    assert manifest.parent_version == 1
    assert manifest.training.feedback == len(tasks) == queued
    assert manifest.training.labelled == 10 * LABELS_PER_CLASS + queued
    assert (repo.resolve("digits", 2).path / "weights.pt").is_file()
    store = LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix)
    assert store.unacknowledged() == []
    snapshot = latest_snapshot(tmp_path / "snapshots" / queue_prefix)
    assert snapshot.version == 1 and {i.task_id for i in snapshot.items} == {t["id"] for t in tasks}
    assert manifest.training.feedback_snapshot == str(snapshot.path)
    assert manifest.training.data == "digits"


@pytest.mark.slow
def test_the_gate_keeps_the_current_version_when_the_candidate_is_worse(
    repo: ModelRepository, queue_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publishes: list[Path] = []
    publish = ModelRepository.publish

    def counted(self: ModelRepository, *args: Any, **kwargs: Any) -> Artifact:
        publishes.append(self.root)
        return publish(self, *args, **kwargs)

    monkeypatch.setattr(ModelRepository, "publish", counted)
    label_directly(queue_prefix, digit_pngs(5))
    store = LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix)
    base = original_data(repo.resolve("digits").manifest, labels_per_class=LABELS_PER_CLASS,
                         progress=False)
    # A margin of -1 asks the candidate to be 100 points better: no candidate can be.
    result = retrain("digits", repo, store, tmp_path / "snapshots",
                     TrainConfig(**TINY_TRAINING), base, margin=-1.0)
    assert result.published is None and publishes == []
    assert repo.versions("digits") == [1]
    assert result.feedback == 5
    assert result.current.n == result.candidate.n > 0  # the same held-out images for both
    assert store.unacknowledged() == []  # the labels are safe in the snapshot all the same

    forced = retrain("digits", repo, store, tmp_path / "snapshots",
                     TrainConfig(**TINY_TRAINING), base, margin=-1.0, force=True)
    assert forced.published is not None and forced.published.manifest.version == 2
    assert publishes == [repo.root]  # once, straight into the repository
    manifest = forced.published.manifest
    assert manifest.parent_version == 1
    assert manifest.metrics.accuracy == forced.candidate.accuracy  # what the gate measured
    assert manifest.training.feedback == 5  # from the snapshot, not Redis
    assert manifest.training.feedback_snapshot == str(forced.snapshot.path)


def test_retrain_without_labels_says_what_to_do(
    repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    result = run_retrain(repo, queue_prefix, tmp_path / "snapshots")
    assert result.returncode == 1
    assert "no labels for 'digits'" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr


def test_snapshots_are_numbered_cumulative_and_only_new_when_labels_are(
    queue_prefix: str, tmp_path: Path
) -> None:
    store = LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix)
    pngs = digit_pngs(3)
    label_directly(queue_prefix, pngs[:2])
    store.unacknowledged("crashed-before-snapshot")  # read, never acknowledged
    first = take_snapshot(store, tmp_path)
    assert (first.version, len(first.items)) == (1, 2)
    assert take_snapshot(store, tmp_path) == first
    label_directly(queue_prefix, pngs[2:])
    second = take_snapshot(store, tmp_path)
    assert (second.version, len(second.items)) == (2, 3)
    assert first.path.read_text() in second.path.read_text()
    for item, (png, label) in zip(second.items, pngs, strict=True):
        assert (tmp_path / item.image).read_bytes() == png and item.label == label
    assert latest_snapshot(tmp_path) == second


def test_labels_stay_unacknowledged_when_the_snapshot_cannot_be_written(
    queue_prefix: str, tmp_path: Path
) -> None:
    store = LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix)
    label_directly(queue_prefix, digit_pngs(2))
    (tmp_path / "images").write_text("a file where the images folder should be")
    with pytest.raises(OSError):
        take_snapshot(store, tmp_path)
    assert latest_snapshot(tmp_path).version == 0
    assert len(store.unacknowledged("next-run")) == 2


def test_retrain_keeps_the_parents_queue_share_unless_one_is_set(
    model_repo: ModelRepository,
) -> None:
    parent = model_repo.resolve("tiny").manifest.model_copy(update={"queue_share": 0.25})
    assert inherit(TrainConfig(), parent).calibration.queue_share == 0.25
    chosen = TrainConfig(calibration={"queue_share": 0.05})
    assert inherit(chosen, parent).calibration.queue_share == 0.05
    from_before = parent.model_copy(update={"queue_share": None})
    default = TrainConfig().calibration.queue_share
    assert inherit(TrainConfig(), from_before).calibration.queue_share == default
