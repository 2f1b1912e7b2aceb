"""Several worker processes on one port (`HALFLABEL_WORKERS`), for a GPU that one Python process
cannot keep busy.

uvicorn's supervisor (`uvicorn.supervisors.Multiprocess`) starts the workers, starts a new one
when one dies, and on SIGTERM or SIGINT stops them all, each draining as a single process does.
Each worker builds its own app: its own ONNX Runtime session, batcher, model polling, spool
directory (service.spool) and connection limits.

Each worker listens on a socket of its own bound with SO_REUSEPORT, so Linux spreads new
connections evenly over them. uvicorn's way, one socket shared by all, lets whichever worker
wakes first accept most of them (uvicorn PR #2472, gunicorn PR #2938).

Metrics: the workers record into a fresh PROMETHEUS_MULTIPROC_DIR, which any of them sums at
`/metrics` (service.metrics); the supervisor takes the live gauges of a worker that has gone out
of the sums.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from litestar import Litestar
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from models.errors import HalflabelError
from models.repository import ModelRepository
from service.server import ServerConfig, curl_example
from service.settings import Settings


class Supervisor(Multiprocess):
    """uvicorn's supervisor; besides, it prints how to get a prediction once every worker is up,
    and takes a worker that has gone out of the live gauges."""

    def __init__(self, config: ServerConfig, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.settings = config.settings
        self._pids: set[int] = set()
        self._announced = False

    def keep_subprocess_alive(self) -> None:  # uvicorn calls it twice a second
        super().keep_subprocess_alive()
        pids = {process.pid for process in self.processes if process.pid is not None}
        for pid in self._pids - pids:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        self._pids = pids
        if self._announced or self.should_exit.is_set():
            return
        if all(process.is_ready(timeout=1) for process in self.processes):
            print(curl_example(self.settings), flush=True)
            self._announced = True

    @property
    def failed_to_start(self) -> bool:
        """Whether a worker could not start (uvicorn then stops the others instead of retrying)."""
        return any(process.exitcode == STARTUP_FAILURE for process in self.processes)


def serve_workers(settings: Settings, build_app: Callable[[Settings], Litestar]) -> int:
    """Serve with `settings.workers` processes, each running `build_app(settings)` (a picklable
    function that ends its process with STARTUP_FAILURE when it cannot build the app), until
    stopped; returns the exit status. What every worker would fail on is checked here first, so
    it is one error (HalflabelError) rather than one per worker."""
    ModelRepository(settings.model_dir).resolve(settings.model_name, settings.model_version)
    listener = _reserve(settings.host, settings.port, "HALFLABEL_PORT")
    if settings.metrics_port:
        _reserve(settings.host, settings.metrics_port, "HALFLABEL_METRICS_PORT").close()
    settings = settings.model_copy(update={"port": listener.getsockname()[1]})  # if it was 0
    config = ServerConfig(functools.partial(build_app, settings), settings)
    with _metrics_directory():
        supervisor = Supervisor(config, [listener])
        supervisor.run()
    return 1 if supervisor.failed_to_start else 0


class _WorkerSocket(socket.socket):
    """The service's address, bound (not listening) in the supervisor so the port stays taken.
    uvicorn sends its sockets to each worker it starts; this one arrives as a new socket on the
    same address, so each worker has its own."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _bind, (socket.socket, self.family, self.getsockname()[:2])


_Socket = TypeVar("_Socket", bound=socket.socket)


def _bind(kind: type[_Socket], family: int, address: tuple[str, int]) -> _Socket:
    sock = kind(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _reserve(host: str, port: int, variable: str) -> _WorkerSocket:
    """Bind host:port for the workers; HalflabelError when another program has it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # Without SO_REUSEPORT first: it fails on a port held by anyone, another service's
        # workers included, where binding with it would share their port.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        listener = _bind(_WorkerSocket, family, (host, port))
    except OSError as exc:
        raise HalflabelError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick a free {variable}"
        ) from None
    return listener


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """A fresh PROMETHEUS_MULTIPROC_DIR while inside, for the workers to inherit."""
    with tempfile.TemporaryDirectory(prefix="halflabel-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
