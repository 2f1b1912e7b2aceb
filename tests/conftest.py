"""Shared fixtures: a tiny published model, a private Redis key prefix, a live service process."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from models.manifest import InputSpec, ManifestDraft, Metrics, TrainingSummary
from models.repository import ModelRepository

# As in trainer/__init__.py: idle OpenMP threads must sleep, not spin, on a shared 2-core machine;
# set here too because some tests import torch before the trainer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REDIS_URL = os.environ.get("HALFLABEL_REDIS_URL", "redis://127.0.0.1:6379/0")
TINY_CLASSES = ("dark", "light")
TINY_SPEC = InputSpec(height=4, width=4, channels=1, color_mode="L", mean=(0.5,), std=(0.25,))


def tiny_onnx_model(path: Path, classes: int = len(TINY_CLASSES)) -> Path:
    """A real ONNX classifier on 1x4x4 images: mean brightness → class, plus entropy output.

    Dark images are confidently 'dark', light ones 'light', mid-grey ones a coin toss.
    """
    import onnx
    from onnx import TensorProto, helper

    centres = np.linspace(-2.0, 2.0, classes).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["brightness"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["brightness", "axis1"], ["b"]),
        helper.make_node("Sub", ["b", "centres"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("Mul", ["sq", "sharpness"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("Log", ["probabilities"], ["logp"]),
        helper.make_node("Mul", ["probabilities", "logp"], ["plogp"]),
        helper.make_node("ReduceSum", ["plogp", "axis1"], ["negent"], keepdims=0),
        helper.make_node("Neg", ["negent"], ["entropy"]),
    ]
    initializers = [
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("centres", TensorProto.FLOAT, [1, classes], centres.tolist()),
        helper.make_tensor("sharpness", TensorProto.FLOAT, [], [-1.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("entropy", TensorProto.FLOAT, ["N"]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_draft(entropy_threshold: float = 0.5) -> ManifestDraft:
    return ManifestDraft(
        classes=TINY_CLASSES,
        input=TINY_SPEC,
        opset=13,
        metrics=Metrics(accuracy=1.0, n_test=3, split="synthetic"),
        entropy_threshold=entropy_threshold,
        training=TrainingSummary(
            labelled=3, pseudo_labelled=0, data="synthetic", data_fingerprint="0" * 64,
            seed=0, backbone="brightness",
        ),
    )


def grey_png(level: int, size: int = 4) -> bytes:
    """A PNG of one grey level: 0 → 'dark', 128 → uncertain, 255 → 'light' for the tiny model."""
    buffer = io.BytesIO()
    Image.new("L", (size, size), level).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def model_repo(tmp_path: Path) -> ModelRepository:
    """A repository holding version 1 of the tiny model named 'tiny'."""
    repo = ModelRepository(tmp_path / "store")
    repo.publish("tiny", tiny_onnx_model(tmp_path / "tiny.onnx"), tiny_draft())
    return repo


@pytest.fixture
def queue_prefix() -> Iterator[str]:
    """A Redis key prefix private to this test; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveService:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]


def start_service(env_overrides: dict[str, str], log: Path, timeout: float = 60) -> LiveService:
    """Start `python -m service` on a free loopback port and wait until it is ready."""
    port = free_port()
    # Each service its own spool unless the test shares one between runs.
    env = {**os.environ, "HALFLABEL_REDIS_URL": REDIS_URL,
           "HALFLABEL_SPOOL_DIR": str(log.with_suffix(".spool")), **env_overrides}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    service = LiveService(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{service.url}/v2/health/ready", timeout=1).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"service not ready after {timeout}s:\n{log.read_text()}")


def stop_service(service: LiveService) -> None:
    service.process.terminate()
    try:
        service.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        service.process.kill()


def tiny_env(repo: ModelRepository, queue_prefix: str, **settings: str) -> dict[str, str]:
    """Environment for a service serving the tiny model; `settings` are more HALFLABEL_* vars."""
    env = {
        "HALFLABEL_MODEL_DIR": str(repo.root),
        "HALFLABEL_MODEL_NAME": "tiny",
        "HALFLABEL_QUEUE_PREFIX": queue_prefix,
    }
    return env | {f"HALFLABEL_{name.upper()}": value for name, value in settings.items()}


@pytest.fixture
def live_service(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> Iterator[LiveService]:
    """The real service process serving the tiny model, queueing under a private prefix."""
    service = start_service(tiny_env(model_repo, queue_prefix), tmp_path / "service.log")
    yield service
    stop_service(service)


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """One service for the tests that only read answers, so the module starts one process."""
    tmp_path = tmp_path_factory.mktemp("service")
    repo = ModelRepository(tmp_path / "store")
    repo.publish("tiny", tiny_onnx_model(tmp_path / "tiny.onnx"), tiny_draft())
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    service = start_service(tiny_env(repo, prefix), tmp_path / "service.log")
    yield service
    stop_service(service)
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
