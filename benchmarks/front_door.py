"""Front-door benchmark: the service at saturation and under 10x overload, with same-run baselines.

Measured in one run on one machine, on the digits model, one PNG (docs/example-digit.png) per
request, over loopback:
- raw: in-process ONNX Runtime images/s and CPU per image, at batch 1 and at the service's
  largest batch (inputs already preprocessed), `--threads` threads;
- bare: saturation requests/s of a bare Litestar endpoint on the service's server stack
  (benchmarks/bare_litestar.py), and its CPU per request;
- saturation: requests/s of `python -m service` under wrk, its CPU per request, and what is
  left of that beyond inference (raw CPU per image at the service's largest batch; the mean
  batch it formed is shown beside it, from `halflabel_batch_size`);
- workers: the same saturation run on the service with `--workers` worker processes (its CPU
  counts every worker), beside the one-process figure;
- overload: `--overload-factor` times the saturating connections for `--overload-seconds`, from
  a small asyncio HTTP/1.1 client in this process (it records every request, which wrk and hey
  do not): goodput (200s per second), 503s and their p50/p99 latency, client timeouts,
  connection errors and 5xx other than 503, plus the 500s the service counted itself. Twice:
  clients that send their next request as soon as a 503 comes back (a flood, as wrk and hey
  do), then clients that wait the 503's Retry-After first, as well-behaved clients do.
Queueing for labelling is off (HALFLABEL_ENTROPY_THRESHOLD=1), so the figures are the predict path.

Run: .venv/bin/python benchmarks/front_door.py --model-dir DIR   (needs wrk: `make bench-tools`)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from models.repository import Artifact, ModelRepository

sys.path.insert(0, str(Path(__file__).parent))
from serving import (  # noqa: E402
    cpu_name,
    cpu_seconds,
    free_port,
    raw_throughput,
    running,
    start_service,
    wrk,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "example-digit.png"
TIMED_OUT, CONNECTION_ERROR = 0, -1  # pseudo status codes of requests that got no answer
console = Console(width=150)
app = typer.Typer(add_completion=False)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text page's samples called `name` that carry `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@dataclass
class Saturation:
    rate: float
    failures: int
    server_cores: float
    loadgen_cores: float
    cpu_ms: float  # server CPU per request
    mean_batch: float = 0.0


def saturate(url: str, pid: int, image: Path, connections: int, seconds: float,
             metrics_url: str | None = None) -> Saturation:
    """wrk at `connections` for `seconds`, with the server's CPU and (if it has metrics) the
    mean batch size it formed."""
    before = httpx.get(metrics_url).text if metrics_url else ""
    cpu = cpu_seconds(pid)
    rate, failures, loadgen = wrk(url, image, "image/png", connections, seconds)
    cores = (cpu_seconds(pid) - cpu) / seconds
    figures = Saturation(rate, failures, cores, loadgen, 1000 * cores / rate)
    if metrics_url:
        after = httpx.get(metrics_url).text
        inputs, batches = (metric(after, name) - metric(before, name)
                           for name in ("halflabel_batch_size_sum", "halflabel_batch_size_count"))
        figures.mean_batch = inputs / batches
    return figures


@dataclass
class Overload:
    seconds: float
    connections: int
    honour_retry_after: bool
    results: list[tuple[int, float]] = field(default_factory=list)  # (status, latency s)
    client_cpu_s: float = 0.0
    server_500s: float = 0.0

    def count(self, status: int) -> int:
        return sum(1 for code, _ in self.results if code == status)

    def latency_ms(self, status: int, percentile: float) -> float:
        latencies = [latency for code, latency in self.results if code == status]
        return float(np.percentile(latencies, percentile)) * 1000 if latencies else float("nan")

    @property
    def other_5xx(self) -> int:
        return sum(1 for code, _ in self.results if code >= 500 and code != 503)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, float]:
    """The status of one HTTP/1.1 response, read to its end, whether the connection stays, and
    its Retry-After in seconds (0 without one)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    keep = headers.get("connection", "").lower() != "close"
    return int(status_line.split()[1]), keep, float(headers.get("retry-after", "0"))


async def _overload(port: int, request: bytes, load: Overload, timeout_s: float) -> None:
    deadline = time.monotonic() + load.seconds

    async def client() -> None:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.monotonic() < deadline:
            started = time.perf_counter()
            status, keep, retry_after = CONNECTION_ERROR, False, 0.0
            try:
                async with asyncio.timeout(timeout_s):
                    streams = streams or await asyncio.open_connection("127.0.0.1", port)
                    streams[1].write(request)
                    status, keep, retry_after = await _read_response(streams[0])
            except TimeoutError:
                status = TIMED_OUT
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                await asyncio.sleep(0.01)  # refused or reset: do not spin
            load.results.append((status, time.perf_counter() - started))
            if not keep and streams is not None:
                streams[1].close()
                streams = None
            if load.honour_retry_after and retry_after:
                await asyncio.sleep(retry_after)
        if streams is not None:
            streams[1].close()

    await asyncio.gather(*(client() for _ in range(load.connections)))


def overload(url: str, image: Path, connections: int, seconds: float, timeout_s: float,
             honour_retry_after: bool) -> Overload:
    """`connections` clients sending one PNG per request as fast as answers come back (after a
    503's Retry-After when `honour_retry_after`)."""
    port = int(url.split(":")[2].split("/")[0])
    body = image.read_bytes()
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    metrics_url = url.replace("/v1/predict", "/metrics")
    before = httpx.get(metrics_url).text
    load = Overload(seconds, connections, honour_retry_after)
    cpu = time.process_time()
    uvloop.run(_overload(port, request, load, timeout_s))
    load.client_cpu_s = time.process_time() - cpu
    time.sleep(timeout_s)  # let the service finish what the clients gave up on
    after = httpx.get(metrics_url).text
    load.server_500s = (metric(after, "halflabel_requests_total", status_code="500")
                        - metric(before, "halflabel_requests_total", status_code="500"))
    return load


def raw_cpu(artifact: Artifact, threads: int, batch: int, seconds: float) -> tuple[float, float]:
    """Raw ONNX Runtime images/s and CPU ms per image at `batch`."""
    cpu = time.process_time()
    rate = raw_throughput(artifact, EXAMPLE.read_bytes(), threads, [batch], seconds)[batch]
    return rate, 1000 * (time.process_time() - cpu) / (rate * seconds)


def _overload_rows(table: Table, load: Overload, saturation: float, timeout_s: float) -> None:
    ok = load.count(200)
    clients = "waiting Retry-After" if load.honour_retry_after else "retrying at once"
    table.add_row(f"overload goodput ({load.connections} conn., {load.seconds:g} s, {clients})",
                  f"{ok / load.seconds:.0f} req/s", f"{ok / load.seconds / saturation:.0%} of "
                  "saturation")
    table.add_row("  200 latency p50 / p99",
                  f"{load.latency_ms(200, 50):.1f} / {load.latency_ms(200, 99):.1f} ms", "")
    table.add_row("  503s", f"{load.count(503)}", f"p50 {load.latency_ms(503, 50):.1f} ms,"
                  f" p99 {load.latency_ms(503, 99):.1f} ms")
    table.add_row("  client timeouts", f"{load.count(TIMED_OUT)}", f"no answer in {timeout_s:g} s")
    table.add_row("  connection errors", f"{load.count(CONNECTION_ERROR)}", "refused or reset")
    table.add_row("  5xx other than 503", f"{load.other_5xx}",
                  f"the service counted {load.server_500s:.0f} 500s in halflabel_requests_total")


def report(raw: dict[int, tuple[float, float]], bare: Saturation, service: Saturation,
           loads: list[Overload], timeout_s: float, workers: dict[int, Saturation]) -> None:
    table = Table(title="Front door (one PNG per request)")
    for column in ("figure", "value", "baseline / note"):
        table.add_column(column)
    (batch1, cpu1), (best, best_cpu) = raw[1], raw[max(raw)]
    table.add_row("raw ONNX Runtime", f"{batch1:.0f} img/s (batch 1), {best:.0f} (batch "
                  f"{max(raw)})", f"CPU {cpu1:.3f} / {best_cpu:.3f} ms per image")
    table.add_row("bare Litestar saturation", f"{bare.rate:.0f} req/s",
                  f"CPU {bare.cpu_ms:.3f} ms per request, {bare.server_cores:.2f} cores")
    table.add_row("service saturation", f"{service.rate:.0f} req/s",
                  f"{service.rate / best:.0%} of raw batch {max(raw)}, "
                  f"{service.rate / bare.rate:.0%} of bare; {service.failures} failed")
    table.add_row("service CPU per request", f"{service.cpu_ms:.3f} ms",
                  f"beyond inference {service.cpu_ms - best_cpu:.3f} ms (mean batch "
                  f"{service.mean_batch:.1f}); {service.server_cores:.2f} cores")
    for count, run in workers.items():
        table.add_row(f"service saturation, {count} workers", f"{run.rate:.0f} req/s",
                      f"{run.rate / service.rate:.2f}x one process; CPU {run.cpu_ms:.3f} ms per "
                      f"request (mean batch {run.mean_batch:.1f}), {run.server_cores:.2f} cores; "
                      f"wrk {run.loadgen_cores:.2f} cores; {run.failures} failed")
    for load in loads:
        _overload_rows(table, load, service.rate, timeout_s)
    clients = ", ".join(f"{load.client_cpu_s / load.seconds:.2f} cores ("
                        f"{1000 * load.client_cpu_s / max(1, len(load.results)):.3f} ms per "
                        "request)" for load in loads)
    table.add_row("load generators' CPU", f"wrk {service.loadgen_cores:.2f} cores",
                  f"overload clients {clients}")
    console.print(table)
    load_avg = os.getloadavg()
    console.print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average "
                  f"{load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}")


@app.command()
def main(
    model_dir: Annotated[
        Path | None, typer.Option(help="Where digits is published [HALFLABEL_MODEL_DIR]")
    ] = None,
    model: Annotated[str, typer.Option(help="The model to serve")] = "digits",
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads, raw and served")] = 1,
    max_batch: Annotated[int, typer.Option(help="The service's HALFLABEL_MAX_BATCH_SIZE")] = 32,
    connections: Annotated[int, typer.Option(help="wrk connections at saturation")] = 64,
    overload_factor: Annotated[int, typer.Option(help="Overload connections / saturation's")] = 10,
    seconds: Annotated[float, typer.Option(help="Length of each saturation run")] = 10,
    overload_seconds: Annotated[float, typer.Option(help="Length of the overload run")] = 20,
    client_timeout: Annotated[float, typer.Option(help="Seconds before a client gives up")] = 10,
    workers: Annotated[
        int, typer.Option(help="Worker processes of a second saturation run; 1: none")
    ] = 2,
) -> None:
    """Measure and print the front-door figures."""
    repo = ModelRepository(model_dir)
    if not repo.versions(model):
        console.print(f"error: no model {model!r} in {repo.root}; run 'make serve' once or pass "
                      "--model-dir")
        raise typer.Exit(1)
    artifact = repo.resolve(model)
    console.print(f"raw ONNX Runtime on {model}, batch 1 and {max_batch}")
    raw = {batch: raw_cpu(artifact, threads, batch, seconds / 2) for batch in (1, max_batch)}
    port = free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "bare_litestar.py"), str(port)]
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / EXAMPLE.name  # wrk writes its script beside the body
        image.write_bytes(EXAMPLE.read_bytes())
        with running(command, {}, f"http://127.0.0.1:{port}/") as bare_pid:
            console.print("bare Litestar endpoint at saturation")
            bare = saturate(f"http://127.0.0.1:{port}/", bare_pid, image, connections, seconds)
        with start_service(artifact, threads, max_batch) as (url, pid):
            console.print("service at saturation")
            service = saturate(url, pid, image, connections, seconds,
                               url.replace("/v1/predict", "/metrics"))
            console.print(f"service at {overload_factor}x overload")
            loads = [overload(url, image, connections * overload_factor, overload_seconds,
                              client_timeout, honour) for honour in (False, True)]
        several = {}
        if workers > 1:
            with start_service(artifact, threads, max_batch, workers) as (url, pid):
                console.print(f"service with {workers} workers at saturation")
                several[workers] = saturate(url, pid, image, connections, seconds,
                                            url.replace("/v1/predict", "/metrics"))
    report(raw, bare, service, loads, client_timeout, several)


if __name__ == "__main__":
    app()
