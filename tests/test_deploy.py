"""The Kubernetes overlays render, are valid for Kubernetes 1.30, pass checkov, and agree with the
Dockerfile and with the programs they run."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import redis
import yaml
from conftest import free_port
from typer.testing import CliRunner

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"
OVERLAYS = ("cpu", "gpu")
WORKLOADS = ("Deployment", "StatefulSet", "CronJob")
REFERENCE = re.compile(r"\$\((\w+)\)")  # Kubernetes' $(VAR) in env values and args


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    """`kubectl kustomize k8s/<target>`: what `kubectl apply -k` would send."""
    result = subprocess.run(
        [BIN / "kubectl", "kustomize", ROOT / "k8s" / target],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict, ...], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def pod_template(workload: dict) -> dict:
    spec = workload["spec"]
    return (spec["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else spec)["template"]


def pods(docs: tuple[dict, ...]) -> Iterator[tuple[str, dict]]:
    """(workload name, pod template) of every workload."""
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        yield workload["metadata"]["name"], pod_template(workload)


def container(docs: tuple[dict, ...], workload: str) -> dict:
    return next(pod["spec"]["containers"][0] for name, pod in pods(docs) if name == workload)


def environment(docs: tuple[dict, ...], workload: str) -> dict[str, str]:
    """The literal variables a workload's container gets, its ConfigMaps' included."""
    spec = container(docs, workload)
    variables: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        variables |= find(docs, "ConfigMap", source["configMapRef"]["name"])[0]["data"]
    return variables | {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions of each Dockerfile stage, as (INSTRUCTION, arguments), inherited ones first."""
    stages: dict[str, list[tuple[str, str]]] = {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction == "FROM":
            parent, _, name = arguments.partition(" AS ")
            current = list(stages.get(parent, []))
            stages[name] = current
        current.append((instruction, arguments))
    return stages


def image_env(stage: str) -> dict[str, str]:
    pairs = [p for i, a in dockerfile_stages()[stage] if i == "ENV" for p in a.split()]
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "halflabel"
    }


def test_checkov_fails_nothing_but_image_digests(tmp_path: Path) -> None:
    checkov = subprocess.run(
        [ROOT / "scripts/ensure-checkov"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(render(f"overlays/{overlay}")))
    result = subprocess.run(
        [checkov, "--directory", tmp_path, "--framework", "kubernetes", "--output", "json",
         "--skip-download", "--skip-check", "CKV_K8S_43"],  # 43: pin by digest
        capture_output=True, text=True, check=False, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # its own packages only
    )
    report = yaml.safe_load(result.stdout)["results"]
    failed = [f"{c['check_id']} {c['resource']}" for c in report["failed_checks"]]
    assert not failed, failed
    assert len(report["passed_checks"]) > 300  # it really checked both overlays
    for skipped in report["skipped_checks"]:  # every exception says why, in the manifest
        assert len(skipped["check_result"]["suppress_comment"]) > 20, skipped["resource"]


def test_services_and_monitors_reach_existing_ports() -> None:
    docs = render("overlays/cpu")
    templates = [pod for _, pod in pods(docs)]
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"].items()
        matching = [p for p in templates if selector <= p["metadata"]["labels"].items()]
        assert matching, service["metadata"]["name"]
        ports = {p["name"] for c in matching[0]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    (monitor,) = render("monitoring")
    scraped = [s for s in find(docs, "Service")
               if monitor["spec"]["selector"]["matchLabels"].items()
               <= s["metadata"]["labels"].items()]
    assert [p["name"] for p in scraped[0]["spec"]["ports"]].count(
        monitor["spec"]["endpoints"][0]["port"]) == 1
    assert monitor["metadata"]["namespace"] == scraped[0]["metadata"]["namespace"]


def test_scraping_needs_no_key() -> None:
    """Annotation scraping and the metrics Service port both point at the keyless listener."""
    docs = render("overlays/cpu")
    pod = pod_template(find(docs, "Deployment", "halflabel-service")[0])
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    env = environment(docs, "halflabel-service")
    assert int(env["HALFLABEL_METRICS_PORT"]) == ports["metrics"] != ports["http"]
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
    assert int(env["HALFLABEL_PORT"]) == ports["http"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_locked_down_with_bounded_resources(overlay: str) -> None:
    for name, pod in pods(render(f"overlays/{overlay}")):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        security = spec["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] >= 10000, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][bound].keys(), (name, bound)
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest", c["image"]
            # With a read-only root, whatever is written goes to a volume.
            writable = {m["mountPath"]: m["name"] for m in c["volumeMounts"]
                        if not m.get("readOnly")}
            if name != "halflabel-redis":
                assert "emptyDir" in volumes[writable["/tmp"]], name


def test_images_match_the_dockerfile() -> None:
    """Same user, same paths, pinned to the project's version, and the trainer's args are a
    command of its ENTRYPOINT (not the program's name again)."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    stages = dockerfile_stages()
    for stage in ("service", "service-gpu", "trainer"):
        assert [a for i, a in stages[stage] if i == "USER"][-1] == "10001", stage
    for overlay, service_stage in (("cpu", "service"), ("gpu", "service-gpu")):
        docs = render(f"overlays/{overlay}")
        for name, pod in pods(docs):
            assert pod["spec"]["securityContext"]["runAsUser"] == 10001, name
        for workload, stage in (("halflabel-service", service_stage),
                                ("halflabel-retrain", "trainer"), ("halflabel-fit", "trainer")):
            spec = container(docs, workload)
            assert spec["image"] == f"halflabel-{stage}:{version}"
            mounts = {m["mountPath"] for m in spec["volumeMounts"]}
            for name, value in image_env(stage).items():
                if name.endswith("_DIR") and name.startswith("HALFLABEL_"):
                    assert environment(docs, workload).get(name, value) == value, name
                    assert value in mounts, (workload, name, value)
    exposed = {a for i, a in stages["service"] if i == "EXPOSE"}
    assert exposed == {"8000 9100"}
    assert ("ENTRYPOINT", '["halflabel-train"]') in stages["trainer"]


def test_trainer_jobs_run_commands_the_trainer_has() -> None:
    from trainer.cli import app

    docs = render("overlays/cpu")
    for workload in ("halflabel-retrain", "halflabel-fit"):
        args = container(docs, workload)["args"]
        result = CliRunner().invoke(app, [*args, "--help"])  # parses every option given
        assert result.exit_code == 0, (args, result.output)
    assert container(docs, "halflabel-retrain")["args"][:2] == ["retrain", "--name"]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_variables_refer_only_to_variables_defined_before(overlay: str) -> None:
    for name, pod in pods(render(f"overlays/{overlay}")):
        for c in pod["spec"]["containers"]:
            defined: set[str] = set()
            for variable in c.get("env", []):
                assert set(REFERENCE.findall(variable.get("value", ""))) <= defined, name
                defined.add(variable["name"])
            assert set(REFERENCE.findall(" ".join(c.get("args", [])))) <= defined, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_the_manifests_give_is_known_and_valid(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each HALFLABEL_* variable is a setting of the program it is given to, with a valid value."""
    from pydantic_settings import BaseSettings

    from models.settings_cli import env_name, settings_fields
    from service.settings import Settings
    from trainer.config import TrainConfig
    from trainer.settings import RetrainSettings

    def names(*models: type[BaseSettings]) -> set[str]:
        return {env_name(m, path) for m in models for path, _ in settings_fields(m)}

    docs = render(f"overlays/{overlay}")
    for workload, models in (("halflabel-service", (Settings,)),
                             ("halflabel-retrain", (TrainConfig, RetrainSettings))):
        given = {n: REFERENCE.sub("x", v) for n, v in environment(docs, workload).items()
                 if n.startswith("HALFLABEL_")}
        assert set(given) <= names(*models), workload
        for name, value in given.items():
            monkeypatch.setenv(name, value)
        for model in models:
            model()  # raises on a bad value
        monkeypatch.undo()


def test_gpu_overlay_puts_service_and_trainer_on_a_gpu() -> None:
    docs = render("overlays/gpu")
    for name, pod in pods(docs):
        if name == "halflabel-redis":
            continue
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert environment(docs, "halflabel-service")["HALFLABEL_DEVICE"] == "cuda"
    assert environment(docs, "halflabel-retrain")["HALFLABEL_TRAIN_FP16"] == "true"


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In) applied to labels."""
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions), "extend selects() for this policy"
    return selector.get("matchLabels", {}).items() <= labels.items() and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def test_only_the_service_and_the_trainer_reach_redis() -> None:
    docs = render("overlays/cpu")
    policies = find(docs, "NetworkPolicy")
    labels = {name: pod["metadata"]["labels"] for name, pod in pods(docs)}
    for name, pod_labels in labels.items():  # every pod is isolated both ways
        kinds = {k for p in policies if selects(p["spec"]["podSelector"], pod_labels)
                 for k in p["spec"]["policyTypes"]}
        assert kinds == {"Ingress", "Egress"}, name
    redis_policies = [p for p in policies
                      if selects(p["spec"]["podSelector"], labels["halflabel-redis"])]
    allowed = {name for name, pod_labels in labels.items()
               for p in redis_policies for rule in p["spec"].get("ingress", [])
               for peer in rule["from"] if selects(peer["podSelector"], pod_labels)}
    assert allowed == {"halflabel-service", "halflabel-retrain", "halflabel-fit"}


def test_redis_as_deployed_asks_for_the_password_and_refuses_writes_when_full(
    tmp_path: Path,
) -> None:
    """Run redis-server on the manifests' config and arguments, and the clients' URL."""
    docs = render("overlays/cpu")
    volumes = pod_template(find(docs, "StatefulSet", "halflabel-redis")[0])["spec"]["volumes"]
    mounted = next(v["configMap"]["name"] for v in volumes if v["name"] == "config")
    config = find(docs, "ConfigMap", mounted)[0]["data"]["redis.conf"]
    spec = container(docs, "halflabel-redis")
    limit = spec["resources"]["limits"]["memory"]
    maxmemory = re.search(r"^maxmemory (\d+)mb$", config, re.MULTILINE)
    assert maxmemory and int(maxmemory[1]) * 2**20 < int(limit.removesuffix("Mi")) * 2**20
    assert "appendonly yes" in config and "maxmemory-policy noeviction" in config
    password, port = "s3cret-from-the-secret", free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(config.replace("dir /data", f"dir {tmp_path}")
                    .replace(maxmemory[0], "maxmemory 2mb"))
    args = [REFERENCE.sub(password, a) for a in spec["args"]]
    args[0] = str(conf)  # the mounted ConfigMap
    server = subprocess.Popen(
        ["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = REFERENCE.sub(password, environment(docs, "halflabel-service")["HALFLABEL_REDIS_URL"])
        url = url.replace("halflabel-redis:6379", f"127.0.0.1:{port}")
        client = redis.Redis.from_url(url, decode_responses=True)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(1000):
                client.set(f"k{i}", b"x" * 10_000)
    finally:
        server.terminate()
        server.wait(timeout=10)
