"""`python -m service` is `halflabel-serve`."""

from service.cli import app

app()
