"""`halflabel-serve` (= `python -m service`): run the inference service.

Its flags are generated from service.settings.Settings by models.settings_cli, as are
halflabel-train's: every field is a flag (`--max-batch-size` for `max_batch_size`) and a
`HALFLABEL_*` environment variable, with the field's description, default and variable as
help; a flag wins over the variable. Every error is one line and exit status 1.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from litestar import Litestar
from uvicorn.config import STARTUP_FAILURE

from models.errors import HalflabelError
from models.settings_cli import with_settings
from service.app import create_app
from service.security import check_exposure
from service.server import Server, configure_logging, raise_file_limit
from service.settings import Settings
from service.spool import held
from service.workers import serve_workers

command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@command.command(help=Settings.__doc__)
@with_settings
def serve(*, settings: Settings) -> int:
    """Load the model and serve it over HTTP until interrupted; the exit status."""
    configure_logging(settings)
    check_exposure(settings)
    raise_file_limit(settings)
    with held(settings.spool_dir):
        if settings.workers > 1:
            return serve_workers(settings, worker_app)
        Server(create_app(settings), settings).run()
    return 0


def worker_app(settings: Settings) -> Litestar:
    """One worker's app (service.workers); an error is one line and ends the worker with the
    status that tells uvicorn's supervisor to stop the service rather than start it again."""
    configure_logging(settings)
    try:
        return create_app(settings)
    except HalflabelError as exc:
        _fail(str(exc), STARTUP_FAILURE)


def app(argv: list[str] | None = None) -> None:
    """Entry point: parse the flags and serve; errors become one line on stderr."""
    try:
        # Not standalone, where typer would draw usage errors in a box and exit with 2; it
        # returns the exit status instead (130 after Ctrl-C, re-raised by uvicorn at shutdown).
        status = command(args=argv, prog_name="halflabel-serve", standalone_mode=False)
    except typer.TyperException as exc:  # bad values, unknown flags
        _fail(f"{exc.format_message()}; see halflabel-serve --help")
    except HalflabelError as exc:
        _fail(str(exc))
    raise SystemExit(status)


def _fail(message: str, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
