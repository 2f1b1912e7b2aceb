"""Label Studio round trip: halflabel's exports into a real Label Studio and its labels back.

On loopback, with nothing shared: a halflabel service serving the tiny brightness model of the
test suite (tests/conftest.py) under a private Redis key prefix, and Label Studio from its own
virtual environment (created here on first use, outside the repository) with its own data dir,
sqlite database, user and API token. The script then

1. queues uncertain images by asking halflabel about them, and labels two in halflabel;
2. creates a Label Studio project with halflabel's labelling config;
3. imports halflabel's labelled export and its pending export (with the model's guesses);
4. checks what Label Studio made of them (task ids, annotations, pre-annotations);
5. annotates the pending tasks through Label Studio's API, one skipped;
6. exports the project as Label Studio JSON and imports it into halflabel, twice;
7. checks the label store: every annotation once, the first labels kept.

Run: .venv/bin/python benchmarks/label_studio_roundtrip.py   (first run: pip installs
label-studio into ~/.cache/halflabel/label-studio-venv, a few minutes)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import grey_png, tiny_draft, tiny_onnx_model  # noqa: E402

from models.labels import LabelStore  # noqa: E402
from models.repository import ModelRepository  # noqa: E402

LABEL_STUDIO_VERSION = "1.23.2"
VENV = Path.home() / ".cache" / "halflabel" / "label-studio-venv"
REDIS_URL = os.environ.get("HALFLABEL_REDIS_URL", "redis://127.0.0.1:6379/0")
UNCERTAIN_LEVELS = (116, 120, 124, 128, 132, 136)  # mid-grey: the tiny model is unsure
LABELLED_IN_HALFLABEL = {116: "dark", 136: "light"}
SKIPPED_IN_LABEL_STUDIO = 128


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_label_studio() -> Path:
    """The label-studio executable, installed into its own venv on first use."""
    executable = VENV / "bin" / "label-studio"
    if not executable.exists():
        log(f"installing label-studio {LABEL_STUDIO_VERSION} into {VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, f"label-studio=={LABEL_STUDIO_VERSION}"], check=True)
    return executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(
    url: str, process: subprocess.Popen[bytes], log_file: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early:\n{log_file.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} not up after {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], health_url: str, log_file: Path,
            timeout: float) -> Iterator[None]:
    with log_file.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(health_url, process, log_file, timeout)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


Service = tuple[str, contextlib.AbstractContextManager[None]]  # its URL, and running it


def halflabel_service(work: Path, prefix: str) -> Service:
    repo = ModelRepository(work / "models")
    repo.publish("tiny", tiny_onnx_model(work / "tiny.onnx"), tiny_draft())
    port = free_port()
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "HALFLABEL_MODEL_DIR": str(repo.root),
        "HALFLABEL_MODEL_NAME": "tiny", "HALFLABEL_QUEUE_PREFIX": prefix,
        "HALFLABEL_REDIS_URL": REDIS_URL,
    }
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return url, running(command, env, f"{url}/v2/health/ready", work / "halflabel.log", 60)


def label_studio(work: Path, token: str) -> Service:
    port = free_port()
    data_dir = work / "label-studio"
    command = [
        str(ensure_label_studio()), "start", "--no-browser", "--internal-host", "127.0.0.1",
        "--port", str(port), "--data-dir", str(data_dir),
        "--database", str(data_dir / "label_studio.sqlite3"),
        "--username", "halflabel@example.com", "--password", secrets.token_urlsafe(12),
        "--user-token", token, "--enable-legacy-api-token",
    ]
    url = f"http://127.0.0.1:{port}"
    return url, running(command, dict(os.environ), f"{url}/health", work / "label-studio.log", 600)


def choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "label", "to_name": "image", "type": "choices",
             "value": {"choices": [label]}}]


def expected_label(level: int) -> str:
    return "dark" if level < 128 else "light"


def round_trip(halflabel_url: str, studio_url: str, token: str, prefix: str) -> dict[str, Any]:
    ids = {level: hashlib.sha256(grey_png(level)).hexdigest() for level in UNCERTAIN_LEVELS}
    report: dict[str, Any] = {}
    with httpx.Client(base_url=halflabel_url, timeout=60) as half, httpx.Client(
        base_url=studio_url, timeout=120, headers={"Authorization": f"Token {token}"}
    ) as studio:
        for level in UNCERTAIN_LEVELS:
            answer = half.post("/v1/predict", content=grey_png(level),
                               headers={"Content-Type": "image/png"}).json()
            assert answer["predictions"][0]["queued_for_labelling"], answer
        deadline = time.monotonic() + 10
        while half.get("/v1/labelling/stats").json()["pending"] < len(ids):
            assert time.monotonic() < deadline, "the predictions never reached the queue"
            time.sleep(0.1)
        for level, label in LABELLED_IN_HALFLABEL.items():
            half.post(f"/v1/labelling/tasks/{ids[level]}/label",
                      json={"label": label, "labeller": "ann"}).raise_for_status()
        config = half.get("/v1/labelling/export/label-studio-config.xml").text
        labelled = half.get("/v1/labelling/export/label-studio.json").json()
        pending = half.get("/v1/labelling/export/label-studio-pending.json").json()
        log(f"halflabel: {len(labelled)} labelled and {len(pending)} pending tasks exported")

        project = studio.post("/api/projects", json={"title": "halflabel round trip",
                                                     "label_config": config})
        project.raise_for_status()
        project_id = project.json()["id"]
        for name, tasks in (("labelled", labelled), ("pending", pending)):
            response = studio.post(f"/api/projects/{project_id}/import", json=tasks)
            assert response.status_code in (200, 201), f"{name} import: {response.text[:2000]}"
            report[f"label_studio_import_{name}"] = {
                key: response.json().get(key)
                for key in ("task_count", "annotation_count", "prediction_count")
            }
            log(f"Label Studio imported the {name} export: {report[f'label_studio_import_{name}']}")

        in_studio = studio.get("/api/tasks", params={"project": project_id, "page_size": 100,
                                                     "fields": "all"}).json()["tasks"]
        by_halflabel_id = {t["data"]["halflabel_task_id"]: t for t in in_studio}
        assert set(by_halflabel_id) == set(ids.values()), "halflabel task ids did not survive"
        report["tasks_in_label_studio"] = len(in_studio)
        report["pre_annotated"] = sum(1 for t in in_studio if t.get("total_predictions"))
        report["annotated_on_import"] = sum(1 for t in in_studio if t.get("total_annotations"))

        for level, task_id in ids.items():
            if level in LABELLED_IN_HALFLABEL:
                continue
            studio_id = by_halflabel_id[task_id]["id"]
            body = ({"result": [], "was_cancelled": True} if level == SKIPPED_IN_LABEL_STUDIO
                    else {"result": choice(expected_label(level))})
            studio.post(f"/api/tasks/{studio_id}/annotations", json=body).raise_for_status()
        exported = studio.get(f"/api/projects/{project_id}/export",
                              params={"exportType": "JSON"})
        exported.raise_for_status()
        studio_export = exported.json()
        report["label_studio_export_sample"] = _sample(studio_export)
        log(f"Label Studio exported {len(studio_export)} tasks")

        first = half.post("/v1/labelling/import/label-studio", json=studio_export)
        again = half.post("/v1/labelling/import/label-studio", json=studio_export)
        for response in (first, again):
            assert response.status_code == 200, response.text
        report["halflabel_import_first"] = {
            k: v for k, v in first.json().items() if k != "labels"}
        report["halflabel_import_again"] = {
            k: v for k, v in again.json().items() if k != "labels"}
        log(f"halflabel import: {report['halflabel_import_first']}, "
            f"again: {report['halflabel_import_again']}")
        report["stats_after"] = half.get("/v1/labelling/stats").json()

    store = {r.task_id: (r.label, r.labeller)
             for r in LabelStore(redis.Redis.from_url(REDIS_URL), prefix).all()}
    report["label_store"] = {f"grey {level}": store.get(task_id)
                             for level, task_id in ids.items()}
    wanted = {ids[level]: expected_label(level) for level in UNCERTAIN_LEVELS
              if level != SKIPPED_IN_LABEL_STUDIO}
    assert {task_id: label for task_id, (label, _) in store.items()} == wanted, store
    return report


def _sample(export: list[dict[str, Any]]) -> dict[str, Any]:
    """One exported task with its image cut short, to show the shape Label Studio exports."""
    task = json.loads(json.dumps(export[-1]))
    task["data"]["image"] = task["data"]["image"][:40] + "..."
    return task


def main() -> None:
    prefix = f"ls-roundtrip-{uuid.uuid4().hex[:8]}"
    token = secrets.token_hex(20)
    with tempfile.TemporaryDirectory(prefix="halflabel-ls-") as tmp:
        work = Path(tmp)
        halflabel_url, halflabel = halflabel_service(work, prefix)
        studio_url, studio = label_studio(work, token)
        try:
            with halflabel:
                log(f"halflabel up at {halflabel_url}; starting Label Studio (migrations: slow)")
                with studio:
                    log(f"Label Studio {LABEL_STUDIO_VERSION} up at {studio_url}")
                    report = round_trip(halflabel_url, studio_url, token, prefix)
        finally:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    print(json.dumps(report, indent=2))
    log("round trip OK: every Label Studio annotation is in the label store once")


if __name__ == "__main__":
    main()
