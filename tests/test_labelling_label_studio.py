"""Label Studio's format through a live service: the labelling config, exports Label Studio
imports as they are, and its JSON export back into the label store, once."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import redis
from conftest import REDIS_URL, LiveService

from models.labels import LabelStore
from tests.test_labelling_http import assert_problem, queue_by_predicting

IMPORT = "/v1/labelling/import/label-studio"
# One task of Label Studio 1.23.2's JSON export, as benchmarks/label_studio_roundtrip.py got it
# from a real Label Studio (its image cut short).
EXPORTED_TASK = json.loads(
    (Path(__file__).parent / "data" / "label-studio-1.23.2-export-task.json").read_text()
)


def studio_export(pending: list[dict[str, Any]], labels: list[str | None]) -> list[dict[str, Any]]:
    """What Label Studio's JSON export makes of halflabel's pending tasks once annotated, each
    task shaped like EXPORTED_TASK: its own task ids, `data` as imported, annotations by user 1;
    None for a task that was skipped."""
    tasks = []
    for number, (task, label) in enumerate(zip(pending, labels, strict=True), start=1):
        exported = copy.deepcopy(EXPORTED_TASK)
        exported.update(id=number, inner_id=number, data=task["data"])
        (annotation,) = exported["annotations"]
        annotation.update(id=number, task=number, was_cancelled=label is None)
        if label is None:
            annotation["result"] = []
        else:
            annotation["result"][0]["value"]["choices"] = [label]
        tasks.append(exported)
    return tasks


def stored_labels(prefix: str) -> dict[str, tuple[str, str]]:
    store = LabelStore(redis.Redis.from_url(REDIS_URL), prefix)
    return {record.task_id: (record.label, record.labeller) for record in store.all()}


def test_the_config_names_what_the_exports_use(live_service: LiveService) -> None:
    queue_by_predicting(live_service, (128,))
    with live_service.client() as client:
        response = client.get("/v1/labelling/export/label-studio-config.xml")
        (task,) = client.get("/v1/labelling/export/label-studio-pending.json").json()
    assert response.headers["content-type"].startswith("application/xml")
    view = ElementTree.fromstring(response.text)
    image, choices = view.find("Image"), view.find("Choices")
    assert image is not None and choices is not None
    assert image.attrib == {"name": "image", "value": "$image"}
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == (
        "label", "image", "single"
    )
    assert [c.get("value") for c in choices.iter("Choice")] == ["dark", "light"]
    (result,) = task["predictions"][0]["result"]
    assert (result["from_name"], result["to_name"], result["type"]) == ("label", "image", "choices")
    assert set(task["data"]) == {"image", "halflabel_task_id"}


def test_exports_are_what_label_studio_imports_as_they_are(live_service: LiveService) -> None:
    most_uncertain_first = queue_by_predicting(live_service, (128, 124, 120))
    labelled_id = most_uncertain_first[0]
    with live_service.client() as client:
        client.post(f"/v1/labelling/tasks/{labelled_id}/label", json={"label": "dark"})
        (labelled,) = client.get("/v1/labelling/export/label-studio.json").json()
        pending = client.get("/v1/labelling/export/label-studio-pending.json").json()
        top = client.get("/v1/labelling/export/label-studio-pending.json", params={"limit": 1})
        stats = client.get("/v1/labelling/stats").json()

    # Label Studio refuses a completed_by it does not know and renumbers tasks; the id is in data.
    assert "id" not in labelled and "completed_by" not in labelled["annotations"][0]
    assert labelled["data"]["halflabel_task_id"] == labelled_id
    assert labelled["annotations"][0]["result"][0]["value"] == {"choices": ["dark"]}
    assert [t["data"]["halflabel_task_id"] for t in pending] == most_uncertain_first[1:]
    assert [t["data"]["halflabel_task_id"] for t in top.json()] == most_uncertain_first[1:2]
    for task in pending:
        assert "annotations" not in task
        header, data = task["data"]["image"].split(",", 1)
        assert header == "data:image/png;base64"
        assert hashlib.sha256(base64.b64decode(data)).hexdigest() == task["data"][
            "halflabel_task_id"
        ]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "tiny:1" and 0.5 <= prediction["score"] <= 1
    assert (stats["pending"], stats["claimed"]) == (2, 0)  # exporting claims nothing


def test_label_studio_labels_come_back_once(live_service: LiveService, queue_prefix: str) -> None:
    ids = queue_by_predicting(live_service, (128, 124, 120))
    with live_service.client() as client:
        pending = client.get("/v1/labelling/export/label-studio-pending.json").json()
        export = studio_export(pending, ["dark", "light", None])
        first = client.post(IMPORT, json=export).json()
        again = client.post(IMPORT, json=export).json()
        changed = copy.deepcopy(export)
        changed[0]["annotations"].append(
            {**changed[0]["annotations"][0], "id": 9, "result": [
                {**changed[0]["annotations"][0]["result"][0], "value": {"choices": ["light"]}}
            ]}
        )
        conflict = client.post(IMPORT, json=changed[:1]).json()
        stats = client.get("/v1/labelling/stats").json()

    assert (first["outcomes"], first["unannotated"]) == ({"recorded": 2}, 1)
    assert (again["outcomes"], again["unannotated"]) == ({"duplicate": 2}, 1)
    # The latest annotation counts; a label different from the stored one is reported, not kept.
    assert conflict["labels"] == [{"task_id": ids[0], "label": "light", "outcome": "conflict"}]
    assert stored_labels(queue_prefix) == {
        ids[0]: ("dark", "label-studio:1"), ids[1]: ("light", "label-studio:1")
    }
    assert (stats["pending"], stats["labelled"]) == (1, 2)


def test_bad_imports_are_refused_whole(live_service: LiveService, queue_prefix: str) -> None:
    queue_by_predicting(live_service, (128,))
    with live_service.client() as client:
        pending = client.get("/v1/labelling/export/label-studio-pending.json").json()
        (good,) = studio_export(pending, ["dark"])

        def with_change(change: dict[str, Any]) -> list[dict[str, Any]]:
            bad = copy.deepcopy(good)
            bad["annotations"][0]["result"][0]["value"] = change.get("value", {"choices": ["dark"]})
            bad["data"] = change.get("data", bad["data"])
            return [good, bad]

        cases = [
            (with_change({"value": {"choices": ["purple"]}}), 422, "use one of: dark, light"),
            (with_change({"value": {"choices": ["dark", "light"]}}), 422, "exactly one 'label'"),
            (with_change({"data": {"image": "x"}}), 422, "only tasks exported by halflabel"),
            (with_change({"data": {"halflabel_task_id": "0" * 64}}), 422, "no task"),
            (with_change({"data": {"halflabel_task_id": "not-hex"}}), 400, "halflabel_task_id"),
            ({"not": "a list"}, 400, "Validation failed"),
        ]
        for body, status, phrase in cases:
            assert_problem(client.post(IMPORT, json=body), status, phrase)
        headers = {"Content-Type": "application/json"}
        malformed = client.post(IMPORT, content=b'[{"data": ', headers=headers)
        deep = client.post(IMPORT, content="[" * 5000 + "]" * 5000, headers=headers)
    assert malformed.status_code == 400, malformed.text
    assert_problem(deep, 400, "nested too deeply")
    assert stored_labels(queue_prefix) == {}  # the good task of each refused import too
