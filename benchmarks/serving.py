"""Serving benchmark: the service over HTTP against raw ONNX Runtime and a naive PyTorch endpoint.

For ResNet-18 at 224x224 (random weights, exported here) and the small default model, measured
in one run on one machine:
- raw: in-process ONNX Runtime throughput at each batch size, and the best;
- HTTP: saturation throughput of `python -m service` (one JPEG/PNG per request, wrk as the
  load generator), as a fraction of the best raw figure;
- latency p50/p99 over HTTP at 50% of the saturation rate (hey, rate-limited);
- naive: saturation throughput of a per-request PyTorch-eager endpoint (ResNet-18 only).
ONNX Runtime and PyTorch get the same number of threads (`--threads`) everywhere.

Run: .venv/bin/python benchmarks/serving.py   (needs wrk and hey: `make bench-tools`)
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

import httpx
import numpy as np
import onnx
import torch
import typer
from onnxruntime.transformers.float16 import convert_float_to_float16
from PIL import Image
from rich.console import Console
from rich.table import Table

from models.manifest import InputSpec, ManifestDraft, Metrics, TrainingSummary
from models.repository import Artifact, ModelRepository
from service.engine import OnnxModel
from service.predictor import decode_for_model

sys.path.insert(0, str(Path(__file__).parent))
from resnet_classifier import resnet18_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_SPEC = InputSpec(height=224, width=224, channels=3, color_mode="RGB",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
RESNET_CLASSES = 1000
console = Console(width=150)
app = typer.Typer(add_completion=False)


@dataclass
class Figures:
    """One model's measurements; per-round lists, compared through their medians."""

    model: str
    raw_sweep: dict[int, float]
    raw: list[float] = field(default_factory=list)
    http: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    http_failures: int = 0
    loadgen_cores: float = 0.0
    service_cores: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    half_load_rate: float = 0.0

    @property
    def best_batch(self) -> int:
        return max(self.raw_sweep, key=self.raw_sweep.__getitem__)


def raw_throughput(
    artifact: Artifact, image: bytes, threads: int, batch_sizes: list[int], seconds: float
) -> dict[int, float]:
    """Images/s of in-process ONNX Runtime at each batch size (inputs already preprocessed)."""
    model = OnnxModel(artifact, intra_op_threads=threads)
    array = decode_for_model(image, artifact.manifest.input, 10**8)[0]
    results = {}
    for size in batch_sizes:
        batch = np.stack([array] * size)
        model.run(batch)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.run(batch)
            done += size
        results[size] = done / (time.perf_counter() - started)
    return results


def wrk(url: str, body: Path, content_type: str, connections: int, seconds: float
        ) -> tuple[float, int, float]:
    """Saturation requests/s, failed requests, and CPU cores the load generator used."""
    script = body.with_suffix(".lua")
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{content_type}"\n'
        f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "60s", "-s",
         str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = float(_first(r"Requests/sec:\s+([\d.]+)", output))
    failures = sum(
        int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|timeout):?\s+(\d+)", output)
    )
    return rate, failures, cpu / seconds


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in:\n{text}")
    return match.group(1)


def latencies_at(url: str, body: Path, content_type: str, rate: float, seconds: float
                 ) -> tuple[float, float, float]:
    """p50 and p99 latency (ms) and the achieved rate when `hey` offers `rate` requests/s.

    Each hey worker is capped at 5 requests/s, so a worker waits far longer between requests
    than a request takes, and requests arrive at the offered rate, not when answers come back.
    """
    workers = max(1, math.ceil(rate / 5))
    output = subprocess.run(
        ["hey", "-z", f"{seconds:g}s", "-c", str(workers), "-q", f"{rate / workers:.4f}",
         "-m", "POST", "-T", content_type, "-D", str(body), "-o", "csv", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(output)))
    failed = [row for row in rows if row["status-code"] != "200"]
    if failed or not rows:
        raise RuntimeError(f"{len(failed)} of {len(rows)} requests failed at {rate:.1f} req/s")
    latencies = np.asarray([float(row["response-time"]) for row in rows]) * 1000
    p50, p99 = np.percentile(latencies, [50, 99])
    return float(p50), float(p99), len(rows) / seconds


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its child processes (a service's workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], ready_url: str,
            ready_line: str | None = None) -> Iterator[int]:
    """Start a server process, wait until `ready_url` answers (and it has printed `ready_line`),
    yield its pid, stop it."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT,
                                   stdout=log, stderr=log)
        try:
            _wait_until_up(process, log, ready_url, ready_line)
            yield process.pid
        finally:
            process.terminate()
            process.wait(timeout=30)


def _wait_until_up(process: subprocess.Popen[bytes], log: IO[bytes], url: str,
                   line: str | None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log.seek(0)
        output = log.read().decode()
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited: {output[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            # 501: the naive server answers GET with "not implemented", which proves it is up.
            up = httpx.get(url, timeout=1).status_code in (200, 501)
            if up and (line is None or line in output):
                return
        time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} within 120s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(
    artifact: Artifact, image: Path, content_type: str, threads: int, batch_sizes: list[int],
    seconds: float, rounds: int, naive_weights: Path | None = None,
) -> Figures:
    """Raw, HTTP and (with weights) naive throughput in alternating rounds, then latency.

    Alternating short rounds and comparing medians keeps load from other processes on a shared
    machine from favouring whichever figure happened to be measured in a quiet moment.
    """
    console.print(f"[bold]{artifact.manifest.name}[/]: raw ONNX Runtime, batch {batch_sizes}")
    figures = Figures(artifact.manifest.name,
                      raw_throughput(artifact, image.read_bytes(), threads, batch_sizes, 2))
    best = figures.best_batch
    with contextlib.ExitStack() as servers:
        service_url, service_pid = servers.enter_context(start_service(artifact, threads, best))
        naive_url = servers.enter_context(start_naive(naive_weights, artifact, threads)) if (
            naive_weights) else None
        for round_ in range(1, rounds + 1):
            naive_part = ", naive" if naive_url else ""
            console.print(f"  round {round_}/{rounds}: raw (batch {best}), HTTP{naive_part}")
            figures.raw.append(
                raw_throughput(artifact, image.read_bytes(), threads, [best], seconds)[best])
            cpu_before = cpu_seconds(service_pid)
            rate, failures, loadgen = wrk(service_url, image, content_type, 2 * best + 8, seconds)
            figures.service_cores = max(figures.service_cores,
                                        (cpu_seconds(service_pid) - cpu_before) / seconds)
            figures.loadgen_cores = max(figures.loadgen_cores, loadgen)
            figures.http.append(rate)
            figures.http_failures += failures
            if naive_url:
                naive_rate, naive_failures, _ = wrk(naive_url, image, content_type, 4, seconds)
                if naive_failures:
                    raise RuntimeError(f"the naive endpoint failed {naive_failures} requests")
                figures.naive.append(naive_rate)
        half = float(np.median(figures.http)) / 2
        console.print(f"  latency at 50% of saturation ({half:.1f} req/s offered)")
        figures.p50_ms, figures.p99_ms, figures.half_load_rate = latencies_at(
            service_url, image, content_type, half, seconds)
    return figures


@contextlib.contextmanager
def start_service(artifact: Artifact, threads: int, max_batch: int, workers: int = 1
                  ) -> Iterator[tuple[str, int]]:
    """`python -m service` on the artifact, batching up to `max_batch`, with `workers` worker
    processes; yields (URL, pid) once every worker is up."""
    port = free_port()
    env = {
        "HALFLABEL_WORKERS": str(workers),
        "HALFLABEL_MODEL_DIR": str(artifact.path.parent.parent),
        "HALFLABEL_MODEL_NAME": artifact.manifest.name,
        "HALFLABEL_MODEL_VERSION": str(artifact.manifest.version),
        "HALFLABEL_INTRA_OP_THREADS": str(threads),
        "HALFLABEL_MAX_BATCH_SIZE": str(max_batch),
        "HALFLABEL_ENTROPY_THRESHOLD": "1.0",  # measure inference, not the labelling queue
        "HALFLABEL_QUEUE_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
    }
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
    # It prints how to get a prediction once every worker is up (the first answers readiness).
    with running(command, env, f"{url}/v2/health/ready", ready_line="curl -s") as pid:
        yield f"{url}/v1/predict", pid


@contextlib.contextmanager
def start_naive(weights: Path, artifact: Artifact, threads: int) -> Iterator[str]:
    """The naive PyTorch-eager endpoint on the same weights; yields its URL."""
    port = free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "naive_torch_server.py"), str(weights),
               str(artifact.path / "manifest.json"), str(port), str(threads)]
    url = f"http://127.0.0.1:{port}/"
    with running(command, {}, url):
        yield url


def publish_resnet18(
    repo: ModelRepository, workdir: Path, fp16: bool
) -> tuple[list[Artifact], Path]:
    """Export ResNet-18 224x224 to ONNX and publish it (plus an FP16 variant when `fp16`);
    also return its weights for the naive baseline."""
    model = resnet18_classifier(RESNET_CLASSES).eval()
    weights = workdir / "resnet18.pt"
    torch.save(model.state_dict(), weights)
    onnx_path = workdir / "resnet18.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but quick and quiet for a plain CNN.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(2, 3, 224, 224),), onnx_path,
            input_names=["image"], output_names=["probabilities", "entropy"],
            dynamic_axes={"image": {0: "N"}, "probabilities": {0: "N"}, "entropy": {0: "N"}},
            opset_version=18, dynamo=False,
        )
    draft = ManifestDraft(
        classes=tuple(f"class-{i}" for i in range(RESNET_CLASSES)), input=IMAGENET_SPEC,
        opset=18, metrics=Metrics(accuracy=0, n_test=0, split="none (random weights)"),
        entropy_threshold=1.0,
        training=TrainingSummary(labelled=0, pseudo_labelled=0, data="none",
                                 data_fingerprint="0" * 64, seed=0, backbone="resnet18"),
    )
    artifacts = [repo.publish("resnet18", onnx_path, draft)]
    if fp16:
        fp16_path = workdir / "resnet18.fp16.onnx"
        half = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
        onnx.save(half, str(fp16_path))
        artifacts.append(
            repo.publish("resnet18-fp16", onnx_path, draft, fp16_onnx_file=fp16_path))
    return artifacts, weights


def photo_like_jpeg(path: Path) -> Path:
    """A 224x224 JPEG with smooth structure and noise, about the size of a real photo."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224] / 224
    channels = [np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0, 1, 2)]
    pixels = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (224, 224, 3)))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def report(figures: list[Figures], threads: int, seconds: float, rounds: int) -> None:
    table = Table(title="Serving benchmark (medians of the rounds)")
    for column in ("model", "raw best img/s", "HTTP sat. req/s", "HTTP/raw", "naive req/s",
                   "HTTP/naive", "p50 @50% ms", "p99 @50% ms", "wrk cores", "service cores"):
        table.add_column(column, justify="right")
    for f in figures:
        raw, http = float(np.median(f.raw)), float(np.median(f.http))
        naive = float(np.median(f.naive)) if f.naive else None
        table.add_row(
            f.model, f"{raw:.1f} (batch {f.best_batch})", f"{http:.1f}", f"{http / raw:.0%}",
            f"{naive:.1f}" if naive else "-", f"{http / naive:.1f}x" if naive else "-",
            f"{f.p50_ms:.0f}", f"{f.p99_ms:.0f}", f"{f.loadgen_cores:.2f}",
            f"{f.service_cores:.2f}",
        )
    console.print(table)
    for f in figures:
        sweep = ", ".join(f"{size}: {rate:.1f}" for size, rate in f.raw_sweep.items())
        console.print(f"{f.model}: raw sweep img/s by batch {sweep}")
        console.print(f"  rounds raw {_list(f.raw)} | HTTP {_list(f.http)} | naive "
                      f"{_list(f.naive)} | failed HTTP requests {f.http_failures} | "
                      f"half load achieved {f.half_load_rate:.1f} req/s")
    load = os.getloadavg()
    console.print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {load[0]:.1f} "
        f"{load[1]:.1f} {load[2]:.1f}; ORT/torch threads {threads}; {rounds} rounds of "
        f"{seconds:g}s per figure"
    )


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values) or "-"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


@app.command()
def main(
    threads: Annotated[int, typer.Option(help="ONNX Runtime / PyTorch threads")] = 1,
    seconds: Annotated[float, typer.Option(help="Length of each measurement")] = 10,
    rounds: Annotated[int, typer.Option(help="Alternating rounds per figure")] = 3,
    small_model: Annotated[str, typer.Option(help="The small default model's name")] = "digits",
    small_model_dir: Annotated[
        Path | None, typer.Option(help="Where it is published [HALFLABEL_MODEL_DIR]")
    ] = None,
) -> None:
    """Measure and print the serving figures."""
    small = ModelRepository(small_model_dir)  # None: the repository the service would use
    if not small.versions(small_model):
        console.print(f"error: no model {small_model!r} in {small.root}; run 'make serve' once "
                      "(it trains one) or pass --small-model-dir")
        raise typer.Exit(1)
    # On a GPU the service serves the FP16 artifact of `resnet18-fp16`, and batches pay off.
    gpu = torch.cuda.is_available()
    resnet_batches = [1, 2, 4, 8, 16, 32, 64, 128, 256] if gpu else [1, 2, 4, 8, 16, 32]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        artifacts, weights = publish_resnet18(ModelRepository(workdir / "store"), workdir, gpu)
        image = photo_like_jpeg(workdir / "photo.jpg")
        figures = [
            measure(artifact, image, "image/jpeg", threads, resnet_batches, seconds, rounds,
                    naive_weights=weights if artifact.manifest.name == "resnet18" else None)
            for artifact in artifacts
        ]
        digit = workdir / "digit.png"
        digit.write_bytes((ROOT / "docs" / "example-digit.png").read_bytes())
        figures.append(measure(small.resolve(small_model), digit, "image/png", threads,
                               [1, 4, 16, 64, 256], seconds, rounds))
    report(figures, threads, seconds, rounds)


if __name__ == "__main__":
    app()
