"""A Redis outage never fails a prediction, and loses no input answered `queued_for_labelling`:
they wait in a bounded on-disk spool until Redis is back, across restarts of the service."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import free_port, grey_png, start_service, stop_service, tiny_env

from models.queue import QueueKeys
from models.repository import ModelRepository

PNG = {"Content-Type": "image/png"}


class RedisServer:
    """A private, throw-away redis-server on a free port that the test can stop and restart."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def metric(text: str, name: str) -> float:
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0]) if values else 0.0


def test_predictions_survive_an_outage_and_buffered_pushes_arrive_after_it(
    model_repo: ModelRepository, private_redis: RedisServer, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, "outage", redis_url=private_redis.url, push_buffer_size="2")
    service = start_service(env, tmp_path / "service.log")
    uncertain = [grey_png(level) for level in (124, 128, 132)]
    try:
        private_redis.stop()
        with service.client() as http:
            answers = [http.post("/v1/predict", content=image, headers=PNG) for image in uncertain]
            during = http.get("/metrics").text
        private_redis.start()
        keys, client = QueueKeys("outage"), redis.Redis.from_url(private_redis.url)
        queued = [a.json()["predictions"][0] for a in answers if a.status_code == 200]
        ids = [p["input_sha256"] for p in queued if p["queued_for_labelling"]]
        deadline = time.monotonic() + 15
        while client.zcard(keys.pending) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        pending = {member.decode() for member in client.zrange(keys.pending, 0, -1)}
    finally:
        stop_service(service)
    assert [a.status_code for a in answers] == [200, 200, 200]
    # The spool holds two tasks; the third overflows, is reported as not queued, and counted.
    assert [p["queued_for_labelling"] for p in queued] == [True, True, False]
    assert metric(during, "halflabel_labelling_push_dropped_total") == 1
    assert metric(during, "halflabel_labelling_push_failures_total") >= 1
    assert pending == set(ids)
    assert f"not queueing input {queued[2]['input_sha256']}" in service.log.read_text()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_inputs_queued_during_an_outage_reach_the_queue_after_the_service_stops(
    model_repo: ModelRepository, private_redis: RedisServer, tmp_path: Path,
    stop_signal: signal.Signals,
) -> None:
    spool = tmp_path / "spool"
    env = tiny_env(model_repo, "spooled", redis_url=private_redis.url, spool_dir=str(spool))
    service = start_service(env, tmp_path / "first.log")
    try:
        private_redis.stop()
        with service.client() as http:
            answers = [http.post("/v1/predict", content=grey_png(level), headers=PNG).json()
                       for level in range(120, 135)]
        service.process.send_signal(stop_signal)
        service.process.wait(timeout=30)
    finally:
        stop_service(service)
    queued = {a["predictions"][0]["input_sha256"] for a in answers
              if a["predictions"][0]["queued_for_labelling"]}
    assert len(queued) == 15
    assert len(list(spool.glob("*/*.task"))) == 15  # nothing reached Redis, everything is on disk

    private_redis.start()
    service = start_service(env, tmp_path / "second.log")
    try:
        keys, client = QueueKeys("spooled"), redis.Redis.from_url(private_redis.url)
        deadline = time.monotonic() + 15
        while client.zcard(keys.pending) < len(queued) and time.monotonic() < deadline:
            time.sleep(0.1)
        pending = {member.decode() for member in client.zrange(keys.pending, 0, -1)}
        images = {task_id: client.get(keys.image(task_id)) for task_id in queued}
    finally:
        stop_service(service)
    assert pending == queued
    assert all(hashlib.sha256(image or b"").hexdigest() == i for i, image in images.items())
    assert not list(spool.glob("*/*.task"))  # removed once Redis had them


def test_a_spool_directory_serves_one_process_at_a_time(
    model_repo: ModelRepository, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, "locked", spool_dir=str(tmp_path / "spool"))
    service = start_service(env, tmp_path / "first.log")
    try:
        with pytest.raises(RuntimeError, match="is in use by another service process"):
            start_service(env, tmp_path / "second.log")
    finally:
        stop_service(service)
