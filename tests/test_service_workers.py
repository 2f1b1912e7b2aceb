"""`--workers N`: N processes on one port, each answering with its own session, one /metrics for
all of them, each its own spool directory, all stopped (each draining) by one SIGTERM."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import LiveService, free_port, grey_png, start_service, stop_service, tiny_env
from prometheus_client.parser import text_string_to_metric_families

from models.repository import ModelRepository

CONNECTIONS = 16  # each lands on either worker by its port's hash: all on one has odds 2**-15


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (command)"
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def connection_owners(server_port: int, client_ports: set[int], pids: set[int]) -> dict[int, int]:
    """Which of `pids` holds the server side of each connection (by client port), from /proc."""
    inodes = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, inode = (line.split()[i] for i in (1, 2, 9))
        client_port = int(remote.split(":")[1], 16)
        if int(local.split(":")[1], 16) == server_port and client_port in client_ports:
            inodes[f"socket:[{inode}]"] = client_port
    owners = {}
    for pid in pids:
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with_inode = inodes.get(os.readlink(descriptor))
            if with_inode is not None:
                owners[with_inode] = pid
    return owners


def wait_for_line(service: LiveService, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in service.log.read_text():
        assert time.monotonic() < deadline, service.log.read_text()
        time.sleep(0.1)


def test_two_workers_answer_on_one_port_share_metrics_and_stop_on_one_sigterm(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    service = start_service(tiny_env(model_repo, queue_prefix, workers="2"), tmp_path / "s.log")
    try:
        wait_for_line(service, "curl -s")  # the supervisor prints it once both workers are up
        workers = children(service.process.pid) - {service.process.pid}
        port = int(service.url.rsplit(":", 1)[1])
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                       for _ in range(CONNECTIONS)]
        for connection in connections:
            connection.request("POST", "/v1/predict", grey_png(40), {"Content-Type": "image/png"})
            assert connection.getresponse().read() and connection.sock is not None
        client_ports = {connection.sock.getsockname()[1] for connection in connections}
        owners = connection_owners(port, client_ports, workers)
        metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
        for connection in connections:
            connection.close()
    except BaseException:
        stop_service(service)
        raise
    assert len(owners) == CONNECTIONS and len(set(owners.values())) == 2, owners
    predictions = sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "halflabel_requests_total" and sample.labels["path"] == "/v1/predict"
    )
    assert predictions == CONNECTIONS  # both workers' requests, whichever answered the scrape
    spool = tmp_path / "s.spool"
    assert sorted(p.name for p in spool.iterdir() if p.is_dir()) == ["worker-0", "worker-1"]

    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=30) == 0
    log = service.log.read_text()
    for pid in set(owners.values()):
        assert not Path(f"/proc/{pid}").exists()
        assert f"Finished server process [{pid}]" in log  # it drained and shut down, not killed
    assert "Traceback" not in log


def test_a_worker_that_cannot_start_stops_the_service_with_its_error(
    model_repo: ModelRepository, queue_prefix: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "worker-0").write_text("")  # not a directory: no worker can take its spool
    env = tiny_env(model_repo, queue_prefix, workers="2", spool_dir=str(spool))
    result = subprocess.run([sys.executable, "-m", "service", "--port", str(free_port())],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    errors = {line for line in result.stderr.splitlines() if line.startswith("error:")}
    assert errors == {f"error: cannot use the spool directory {spool / 'worker-0'}: File exists; "
                      "set HALFLABEL_SPOOL_DIR to a writable directory"}, result.stderr
