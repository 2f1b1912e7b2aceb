"""The label store: read by the trainer's consumer group, acknowledged after the snapshot."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import REDIS_URL, TINY_CLASSES, free_port, grey_png

from models.labels import LabelStore
from models.queue import LabellingQueue
from tests.test_queue import push_greys


def label_greys(q: LabellingQueue, levels: list[int], label: str = "dark") -> list[str]:
    ids = push_greys(q, levels)
    for task_id in ids:
        q.label(task_id, label, "ann", TINY_CLASSES)
    return ids


def test_records_carry_everything_the_trainer_needs(queue_prefix: str) -> None:
    q = LabellingQueue.from_url(REDIS_URL, queue_prefix)
    (task_id,) = label_greys(q, [128], "light")
    (record,) = LabelStore(q.client, queue_prefix).unacknowledged()
    assert (record.task_id, record.label, record.labeller) == (task_id, "light", "ann")
    assert record.image == grey_png(128)
    assert (record.task.model_name, record.task.model_version) == ("tiny", 1)


def test_acknowledged_labels_are_not_read_again(queue_prefix: str) -> None:
    q = LabellingQueue.from_url(REDIS_URL, queue_prefix)
    store = LabelStore(q.client, queue_prefix)
    first = label_greys(q, [10, 20])
    assert store.acknowledge(store.unacknowledged()) == 2
    assert store.unacknowledged() == []
    second = label_greys(q, [30])
    assert [r.task_id for r in store.unacknowledged()] == second
    assert [r.task_id for r in store.all()] == first + second


def test_labels_read_but_not_acknowledged_are_read_again(queue_prefix: str) -> None:
    q = LabellingQueue.from_url(REDIS_URL, queue_prefix)
    ids = label_greys(q, [10, 20, 30])
    assert len(LabelStore(q.client, queue_prefix).unacknowledged("crashes")) == 3
    again = LabelStore(q.client, queue_prefix).unacknowledged("next-run")
    assert [r.task_id for r in again] == ids


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A private redis-server with append-only persistence, as deployed."""
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture
def redis_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Redis servers a test starts; all killed afterwards."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def test_labels_and_tasks_survive_a_redis_crash(
    tmp_path: Path, redis_processes: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_processes.append(start_redis(port, tmp_path))
    q = LabellingQueue.from_url(url, "fault")
    labelled = label_greys(q, [10])
    waiting = push_greys(q, [200])

    redis_processes[0].kill()  # SIGKILL: no shutdown save, only the append-only file remains
    redis_processes[0].wait()
    redis_processes.append(start_redis(port, tmp_path))

    q = LabellingQueue.from_url(url, "fault")
    assert [r.task_id for r in LabelStore(q.client, "fault").unacknowledged()] == labelled
    assert [t.record.id for t in q.claim("ann")] == waiting
