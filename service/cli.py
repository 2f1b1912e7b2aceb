"""`halflabel-serve` (= `python -m service`): run the inference service.

Its flags are generated from service.settings.Settings by pydantic-settings: every field is a
flag (`--max-batch-size` for `max_batch_size`) and a `HALFLABEL_*` environment variable, with
the field's description and default as help; a flag wins over the variable.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from models.errors import HalflabelError
from service.app import create_app
from service.security import check_exposure
from service.server import Server, raise_file_limit
from service.settings import Settings


def app(argv: list[str] | None = None) -> None:
    """Read the settings, load the model, and serve it over HTTP until interrupted."""
    try:
        settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
        check_exposure(settings)
        raise_file_limit(settings)
        service = create_app(settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        where, why = ".".join(map(str, first["loc"])), first["msg"].removeprefix("Value error, ")
        _fail(f"bad setting {where}: {why}")
    except SettingsError as exc:  # what argparse refuses: unknown flags, missing values
        _fail(f"{str(exc).removeprefix('error parsing CLI: ')}; see halflabel-serve --help")
    except HalflabelError as exc:
        _fail(str(exc))
    Server(service, settings).run()


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
