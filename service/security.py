"""API keys and scopes.

Keys come from `HALFLABEL_API_KEYS` (or `--api-keys`): entries `KEY:SCOPE[,SCOPE]` separated by
';', e.g. `HALFLABEL_API_KEYS="k1:predict,label;k2:admin"`. Scopes are `predict`, `label` and
`admin`, each granting only itself. Clients send `Authorization: Bearer KEY`.

With no keys configured every route is open, which is only allowed on a loopback address unless
the operator says `--allow-open` (`HALFLABEL_ALLOW_OPEN=true`): see `check_exposure`.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from service.errors import ExposureError
from service.settings import Scope, Settings

Guard = Callable[[ASGIConnection, BaseRouteHandler], Awaitable[None]]


def requires_scope(scope: Scope) -> Guard:
    """A Litestar guard letting through requests whose bearer key holds `scope`."""

    # Async although it never awaits: Litestar runs a sync guard on a worker thread, a hop that
    # cost more CPU per request than the guard itself.
    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        settings: Settings = connection.app.state.settings
        if not settings.api_keys:
            return
        scopes = _scopes_of(connection.headers.get("authorization", ""), settings)
        if scopes is None:
            raise NotAuthorizedException(
                "missing or unknown API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope not in scopes:
            raise PermissionDeniedException(
                f"this API key lacks the '{scope}' scope; use a key that has it"
            )

    return guard


def _scopes_of(authorization: str, settings: Settings) -> frozenset[str] | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    # Compare every key in constant time so response timing does not reveal a key's prefix.
    found = None
    for key, scopes in settings.api_keys.items():
        if secrets.compare_digest(key.encode(), token.strip().encode()):
            found = scopes
    return found


def check_exposure(settings: Settings) -> None:
    """Refuse to run open (no API keys) on a non-loopback address unless told to."""
    if settings.api_keys or settings.allow_open or is_loopback(settings.host):
        return
    raise ExposureError(
        f"refusing to listen on {settings.host} with no API keys: set HALFLABEL_API_KEYS "
        "(--api-keys), or pass --allow-open (HALFLABEL_ALLOW_OPEN=true) to run open on purpose"
    )


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
