"""`halflabel-serve` (= `python -m service`): run the inference service.

Every flag mirrors a `HALFLABEL_*` environment variable (see service.settings); a flag wins
over the variable.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import uvicorn
from pydantic import ValidationError

from models.errors import HalflabelError
from service.app import create_app
from service.security import check_exposure, is_loopback
from service.settings import Settings

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])

EXAMPLE_IMAGE = "docs/example-digit.png"


class _AnnouncingServer(uvicorn.Server):
    """Prints how to get a first prediction once the socket is listening."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(curl_example(self.settings), flush=True)


def curl_example(settings: Settings) -> str:
    """One curl command line that gets a prediction from this service."""
    host = settings.host if is_loopback(settings.host) else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    auth = " -H 'Authorization: Bearer <your key>'" if settings.api_keys else ""
    return (
        f"curl -s{auth} -H 'Content-Type: image/png' --data-binary @{EXAMPLE_IMAGE} "
        f"http://{host}:{settings.port}/v1/predict"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [8000]")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model repository root")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model to serve [digits]")] = None,
    model_version: Annotated[int | None, typer.Option(help="Pin a version [latest]")] = None,
    poll_interval_s: Annotated[float | None, typer.Option(help="Seconds between polls")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [auto]")] = None,
    intra_op_threads: Annotated[int | None, typer.Option(help="ORT threads [0 = all]")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest batch [32]")] = None,
    max_queue_delay_ms: Annotated[float | None, typer.Option(help="Batching wait [2]")] = None,
    max_queue_size: Annotated[int | None, typer.Option(help="Waiting inputs before 503")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="Per-request limit")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Labelling queue Redis")] = None,
    queue_prefix: Annotated[str | None, typer.Option(help="Redis key prefix")] = None,
    entropy_threshold: Annotated[float | None, typer.Option(help="Override the manifest's")] = None,
    push_buffer_size: Annotated[int | None, typer.Option(help="Pushes held in an outage")] = None,
    api_keys: Annotated[str | None, typer.Option(help="'KEY:SCOPE,SCOPE;KEY2:SCOPE'")] = None,
    allow_open: Annotated[
        bool | None, typer.Option("--allow-open", help="Run without keys beyond loopback")
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Request body limit")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Image pixel limit")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve the model over HTTP until interrupted."""
    # Flags given on the command line override the environment; the rest come from it.
    flags = {name: value for name, value in locals().items() if value is not None}
    flags.pop("log_level")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings(**flags)
        check_exposure(settings)
        service = create_app(settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}")
    except HalflabelError as exc:
        _fail(str(exc))
    config = uvicorn.Config(
        service, host=settings.host, port=settings.port, log_level=log_level, access_log=False
    )
    _AnnouncingServer(config, settings).run()


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
