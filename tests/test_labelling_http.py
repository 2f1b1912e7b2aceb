"""The labelling routes through a live service: uncertain predictions in, labels out."""

from __future__ import annotations

import base64
import hashlib
import io
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import redis
from conftest import (
    REDIS_URL,
    LiveService,
    free_port,
    grey_png,
    start_service,
    stop_service,
    tiny_env,
)
from litestar.testing import TestClient

from models.labels import LabelStore
from models.repository import ModelRepository
from service.app import REDIS_CLIENT_NAME, create_app
from service.labelling.page import STATIC_DIR
from service.settings import Settings
from tests.test_service_redis_outage import RedisServer, private_redis

__all__ = ["private_redis"]  # the fixture, imported for the shutdown test
PNG = {"Content-Type": "image/png"}

UNCERTAIN_LEVELS = (124, 128, 132)


def queue_by_predicting(service: LiveService, levels: tuple[int, ...], **headers: str) -> list[str]:
    """Ask the service about mid-grey images, which it is unsure of, until all are queued."""
    with service.client(headers=headers) as client:
        for level in levels:
            response = client.post(
                "/v1/predict", content=grey_png(level), headers={"Content-Type": "image/png"}
            )
            assert response.json()["predictions"][0]["queued_for_labelling"] is True
        deadline = time.monotonic() + 10
        while client.get("/v1/labelling/stats").json()["pending"] < len(levels):
            assert time.monotonic() < deadline, "predictions never reached the queue"
            time.sleep(0.05)
    return [hashlib.sha256(grey_png(level)).hexdigest() for level in levels]


def assert_problem(response: httpx.Response, status: int, phrase: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert phrase in response.json()["detail"]


def test_claim_fetch_and_label_end_to_end(live_service: LiveService, queue_prefix: str) -> None:
    queue_by_predicting(live_service, UNCERTAIN_LEVELS)
    with live_service.client() as client:
        claimed = client.get("/v1/labelling/tasks", params={"limit": 2, "labeller": "ann"}).json()
        assert len(claimed["tasks"]) == 2
        task = claimed["tasks"][0]
        assert task["classes"] == ["dark", "light"]
        assert {g["label"] for g in task["guesses"]} == {"dark", "light"}
        assert task["normalized_entropy"] >= claimed["tasks"][1]["normalized_entropy"]

        image = client.get(task["image_url"])
        assert image.headers["content-type"] == "image/png"
        assert hashlib.sha256(image.content).hexdigest() == task["id"]

        url = f"/v1/labelling/tasks/{task['id']}/label"
        first = client.post(url, json={"label": "light", "labeller": "ann"})
        assert first.json()["outcome"] == "recorded"
        assert client.post(url, json={"label": "light", "labeller": "ann"}).json()["outcome"] == (
            "duplicate"
        )
        assert_problem(client.post(url, json={"label": "dark"}), 409, "already labelled 'light'")
        stats = client.get("/v1/labelling/stats").json()

    assert (stats["pending"], stats["claimed"], stats["labelled"]) == (1, 1, 1)
    (record,) = LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix).all()
    assert (record.task_id, record.label, record.labeller) == (task["id"], "light", "ann")
    assert (record.task.model_name, record.task.model_version) == ("tiny", 1)


def test_bad_labels_and_ids_are_refused_clearly(live_service: LiveService) -> None:
    (task_id,) = queue_by_predicting(live_service, (128,))
    with live_service.client() as client:
        url = f"/v1/labelling/tasks/{task_id}/label"
        assert_problem(client.post(url, json={"label": "purple"}), 422, "use one of: dark, light")
        assert_problem(client.post(url, json={}), 400, "label")
        unknown = f"/v1/labelling/tasks/{'0' * 64}/label"
        assert_problem(client.post(unknown, json={"label": "dark"}), 404, "no task")
        assert_problem(client.get("/v1/labelling/tasks/not-an-id/image"), 404, "64 hex")
        assert_problem(client.get("/v1/labelling/tasks", params={"limit": 0}), 400, "limit")


def test_hostile_bodies_and_paths_are_4xx(live_service: LiveService) -> None:
    (task_id,) = queue_by_predicting(live_service, (128,))
    deep = "[" * 5000 + "]" * 5000
    with live_service.client() as client:
        url = f"/v1/labelling/tasks/{task_id}/label"
        for body in (deep, '{"label": ' + deep + "}"):
            response = client.post(url, content=body, headers={"Content-Type": "application/json"})
            assert_problem(response, 400, "nested too deeply")
        assert_problem(client.get("/label/static/label.js%00.html"), 404, "no asset")
        assert_problem(client.get("/label/static/..%2Fstatic%2Flabel.html"), 404, "no route")
        script = client.get("/label/static/label.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javas")
    assert script.content == (STATIC_DIR / "label.js").read_bytes()


def test_release_gives_the_task_back(live_service: LiveService) -> None:
    (task_id,) = queue_by_predicting(live_service, (128,))
    with live_service.client() as client:
        client.get("/v1/labelling/tasks", params={"labeller": "ann"})
        assert client.get("/v1/labelling/tasks", params={"labeller": "bob"}).json()["tasks"] == []
        url = f"/v1/labelling/tasks/{task_id}/release"
        assert_problem(client.post(url, json={"labeller": "bob"}), 409, "not claimed by 'bob'")
        assert client.post(url, json={"labeller": "ann"}).json()["released"] is True
        tasks = client.get("/v1/labelling/tasks", params={"labeller": "bob"}).json()["tasks"]
    assert [t["id"] for t in tasks] == [task_id]


def test_exports_hold_every_labelled_image(live_service: LiveService) -> None:
    ids = queue_by_predicting(live_service, UNCERTAIN_LEVELS)
    labels = dict(zip(ids, ("dark", "light", "dark"), strict=True))
    with live_service.client() as client:
        for task_id, label in labels.items():
            client.post(f"/v1/labelling/tasks/{task_id}/label", json={"label": label})
        folder = client.get("/v1/labelling/export/images.zip")
        studio = client.get("/v1/labelling/export/label-studio.json").json()

    archive = zipfile.ZipFile(io.BytesIO(folder.content))
    expected = {f"{label}/{task_id}.png": task_id for task_id, label in labels.items()}
    assert set(archive.namelist()) == set(expected)
    for name, task_id in expected.items():
        assert hashlib.sha256(archive.read(name)).hexdigest() == task_id

    assert {t["data"]["halflabel_task_id"] for t in studio} == set(ids)
    for task in studio:
        task_id = task["data"]["halflabel_task_id"]
        header, data = task["data"]["image"].split(",", 1)
        assert header == "data:image/png;base64"
        assert hashlib.sha256(base64.b64decode(data)).hexdigest() == task_id
        assert task["annotations"][0]["result"][0]["value"]["choices"] == [labels[task_id]]
        assert task["predictions"][0]["model_version"] == "tiny:1"


@pytest.mark.slow
def test_the_lease_setting_holds_claims_and_a_bad_one_fails_start_up(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, queue_prefix, label_lease_seconds="0.5")
    service = start_service(env, tmp_path / "service.log")
    try:
        queue_by_predicting(service, (128,))
        with service.client() as client:
            claim = client.get("/v1/labelling/tasks", params={"labeller": "ann"}).json()
            assert claim["lease_seconds"] == 0.5
            assert client.get("/v1/labelling/stats").json()["claimed"] == 1
            time.sleep(0.7)
            stats = client.get("/v1/labelling/stats").json()  # no claim in between
        assert (stats["pending"], stats["claimed"], stats["lease_expired"]) == (1, 0, 1)
    finally:
        stop_service(service)

    bad = tiny_env(model_repo, queue_prefix, label_lease_seconds="0")
    bad_lease = "Invalid value for '--label-lease-seconds'.*HALFLABEL_LABEL_LEASE_SECONDS"
    with pytest.raises(RuntimeError, match=bad_lease):
        start_service(bad, tmp_path / "bad.log")


def test_one_named_redis_client_serves_the_app_and_is_closed_at_shutdown(
    model_repo: ModelRepository, private_redis: RedisServer
) -> None:
    settings = Settings(
        model_dir=model_repo.root, model_name="tiny", redis_url=private_redis.url,
        queue_prefix="shutdown",
    )
    observer = redis.Redis.from_url(private_redis.url)

    def others() -> list[str]:
        me = str(observer.client_id())
        return [c["name"] for c in observer.client_list() if c["id"] != me]

    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/predict", content=grey_png(128), headers=PNG).json()
        assert answer["predictions"][0]["queued_for_labelling"] is True
        deadline = time.monotonic() + 10
        while client.get("/v1/labelling/stats").json()["pending"] < 1:  # pushed, and read back
            assert time.monotonic() < deadline, "the prediction never reached the queue"
            time.sleep(0.05)
        assert others() and set(others()) == {REDIS_CLIENT_NAME}
    deadline = time.monotonic() + 2
    while others() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert others() == []


@pytest.mark.slow
def test_labelling_needs_the_label_scope(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    env = tiny_env(model_repo, queue_prefix, api_keys="p-key:predict;l-key:label")
    service = start_service(env, tmp_path / "service.log")
    try:
        with service.client() as client:
            stats = "/v1/labelling/stats"
            assert_problem(client.get(stats), 401, "Authorization")
            denied = client.get(stats, headers={"Authorization": "Bearer p-key"})
            assert_problem(denied, 403, "'label' scope")
            allowed = client.get(stats, headers={"Authorization": "Bearer l-key"})
            assert allowed.status_code == 200
            for route in ("/v1/labelling/export/label-studio-pending.json",
                          "/v1/labelling/export/label-studio-config.xml"):
                assert_problem(client.get(route), 401, "Authorization")
            assert_problem(client.post("/v1/labelling/import/label-studio", json=[]), 401, "Bearer")
            # The page and its assets hold no data.
            assert client.get("/label").status_code == 200
            assert client.get("/label/static/label.css").status_code == 200
    finally:
        stop_service(service)


@pytest.mark.slow
def test_redis_outage_is_a_503_not_a_500(model_repo: ModelRepository, tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    service = start_service(tiny_env(model_repo, "unused", redis_url=nowhere),
                            tmp_path / "service.log")
    try:
        with service.client() as client:
            assert_problem(client.get("/v1/labelling/tasks"), 503, "HALFLABEL_REDIS_URL")
    finally:
        stop_service(service)
