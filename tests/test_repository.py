"""The model repository contract: manifest, atomic publish, resolution, tamper detection."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from conftest import tiny_draft, tiny_onnx_model
from pydantic import ValidationError

from models.errors import InvalidArtifactError, ModelNotFoundError, TamperedArtifactError
from models.manifest import InputSpec, Manifest
from models.repository import STALE_STAGING_S, ModelRepository, parse_reference, sha256_file
from models.schema import manifest_json_schema

SCHEMA_FILE = Path(__file__).parents[1] / "docs" / "manifest.schema.json"


def test_manifest_round_trips_through_json(model_repo: ModelRepository) -> None:
    manifest = model_repo.resolve("tiny").manifest
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest
    assert manifest.name == "tiny" and manifest.version == 1
    assert manifest.onnx_sha256 == sha256_file(model_repo.root / "tiny" / "1" / "model.onnx")


def test_the_queue_share_round_trips_and_a_manifest_from_before_it_loads(
    model_repo: ModelRepository, tmp_path: Path,
) -> None:
    onnx_file = tiny_onnx_model(tmp_path / "shared.onnx")
    published = model_repo.publish("tiny", onnx_file, tiny_draft().model_copy(
        update={"queue_share": 0.25}))
    assert model_repo.resolve("tiny", published.manifest.version).manifest.queue_share == 0.25
    path = model_repo.root / "tiny" / "1" / "manifest.json"
    document = json.loads(path.read_text())
    del document["queue_share"]  # as written before the field existed
    path.write_text(json.dumps(document))
    old = model_repo.resolve("tiny", 1).manifest
    assert old.queue_share is None and old.entropy_threshold == 0.5


def test_committed_json_schema_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == manifest_json_schema(), (
        "docs/manifest.schema.json is stale: run 'python -m models.schema'"
    )


def test_manifest_schema_validates_a_published_manifest(model_repo: ModelRepository) -> None:
    document = json.loads((model_repo.root / "tiny" / "1" / "manifest.json").read_text())
    jsonschema.validate(document, manifest_json_schema())


@pytest.mark.parametrize(
    "change",
    [
        {"color_mode": "RGB"},  # 1 channel but RGB
        {"mean": (0.5, 0.5)},  # one mean per channel
        {"std": (0.0,)},  # division by zero
    ],
)
def test_inconsistent_input_spec_is_rejected(change: dict) -> None:
    fields = {"height": 4, "width": 4, "channels": 1, "color_mode": "L", "mean": (0.5,),
              "std": (0.25,)}
    with pytest.raises(ValidationError):
        InputSpec(**{**fields, **change})


def test_manifests_from_before_the_feedback_fields_still_load(
    model_repo: ModelRepository,
) -> None:
    path = model_repo.root / "tiny" / "1" / "manifest.json"
    document = json.loads(path.read_text())
    del document["training"]["feedback"], document["training"]["feedback_snapshot"]
    path.write_text(json.dumps(document))
    training = model_repo.resolve("tiny").manifest.training
    assert (training.feedback, training.feedback_snapshot) == (0, None)


def test_unknown_manifest_fields_are_rejected(model_repo: ModelRepository) -> None:
    document = json.loads((model_repo.root / "tiny" / "1" / "manifest.json").read_text())
    document["surprise"] = 1
    with pytest.raises(ValidationError):
        Manifest.model_validate(document)


def test_versions_increase_and_latest_resolves(model_repo: ModelRepository, tmp_path: Path) -> None:
    onnx_file = tmp_path / "tiny.onnx"
    second = model_repo.publish("tiny", onnx_file, tiny_draft().model_copy(
        update={"parent_version": 1}))
    assert second.manifest.version == 2
    assert model_repo.versions("tiny") == [1, 2]
    assert model_repo.resolve("tiny").manifest.version == 2
    assert model_repo.resolve("tiny", 1).manifest.version == 1
    assert model_repo.names() == ["tiny"]


def test_unknown_name_and_version_name_the_problem(model_repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named 'nope'.*tiny"):
        model_repo.resolve("nope")
    with pytest.raises(ModelNotFoundError, match="no version 7.*versions: 1"):
        model_repo.resolve("tiny", 7)


def test_parse_reference() -> None:
    assert parse_reference("digits") == ("digits", None)
    assert parse_reference("digits:latest") == ("digits", None)
    assert parse_reference("digits:3") == ("digits", 3)
    with pytest.raises(ModelNotFoundError):
        parse_reference("digits:three")


def test_tampered_model_is_refused(model_repo: ModelRepository) -> None:
    onnx_path = model_repo.root / "tiny" / "1" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(TamperedArtifactError, match="sha256"):
        model_repo.resolve("tiny")


def test_corrupt_manifest_is_refused(model_repo: ModelRepository) -> None:
    (model_repo.root / "tiny" / "1" / "manifest.json").write_text('{"name": "tiny"}')
    with pytest.raises(InvalidArtifactError, match="manifest.json is invalid"):
        model_repo.resolve("tiny")


def test_failed_publish_leaves_no_version(model_repo: ModelRepository, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        model_repo.publish("tiny", tmp_path / "missing.onnx", tiny_draft())
    assert model_repo.versions("tiny") == [1]
    assert [p.name for p in (model_repo.root / "tiny").iterdir()] == ["1"]


def test_publish_removes_only_abandoned_staging_folders(
    model_repo: ModelRepository, tmp_path: Path
) -> None:
    """A publisher killed mid-way leaves `.staging-*` behind; a live one's stays untouched."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    here, directory = socket.gethostname(), model_repo.root / "tiny"
    folders = {
        "dead": directory / f".staging-{finished.stdout.strip()}@{here}@dead",
        "live": directory / f".staging-{os.getpid()}@{here}@live",
        "elsewhere": directory / ".staging-1@another-host@recent",
        "stale": directory / ".staging-1@another-host@stale",
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half a model")
    an_hour_ago = time.time() - STALE_STAGING_S - 60
    os.utime(folders["stale"], (an_hour_ago, an_hour_ago))

    model_repo.publish("tiny", tmp_path / "tiny.onnx", tiny_draft())

    left = {p.name for p in directory.iterdir()}
    assert left == {"1", "2", folders["live"].name, folders["elsewhere"].name}


def _publish_many(root: str, onnx_file: str, count: int) -> list[int]:
    repo = ModelRepository(root)
    return [repo.publish("race", Path(onnx_file), tiny_draft()).manifest.version
            for _ in range(count)]


def test_concurrent_publishers_never_share_a_version(tmp_path: Path) -> None:
    onnx_file = str(tiny_onnx_model(tmp_path / "tiny.onnx"))
    root = str(tmp_path / "store")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_publish_many, [(root, onnx_file, 10), (root, onnx_file, 10)])
    versions = sorted(results[0] + results[1])
    assert versions == list(range(1, 21))
    assert ModelRepository(root).versions("race") == list(range(1, 21))


def test_concurrent_reader_never_sees_half_a_version(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "store")
    onnx_file = tiny_onnx_model(tmp_path / "tiny.onnx")
    repo.publish("live", onnx_file, tiny_draft())
    done = threading.Event()
    failures: list[Exception] = []
    seen: set[int] = set()

    def read_latest() -> None:
        while not done.is_set():
            try:
                seen.add(repo.resolve("live").manifest.version)
            except Exception as exc:  # any failure here is a half-visible version
                failures.append(exc)

    reader = threading.Thread(target=read_latest)
    reader.start()
    try:
        for _ in range(30):
            repo.publish("live", onnx_file, tiny_draft())
    finally:
        done.set()
        reader.join()
    assert failures == []
    assert len(seen) > 1  # the reader really overlapped with publishing
