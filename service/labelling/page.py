"""The `/label` page and its two assets. They hold no data, so they need no key; the page asks
for one with the `label` scope when the service uses keys."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

from litestar import MediaType, Response, get

from service.labelling.tasks import refusal

STATIC_DIR = Path(__file__).parent.parent / "static"
# Served by name from this table, never by path, so no request can reach another file.
ASSETS = {"label.js": "text/javascript", "label.css": "text/css"}


@get("/label", include_in_schema=False, media_type=MediaType.HTML, sync_to_thread=False)
def labelling_page() -> bytes:
    """The labelling page (plain HTML; it calls the labelling routes)."""
    return (STATIC_DIR / "label.html").read_bytes()


@get("/label/static/{name:str}", include_in_schema=False, sync_to_thread=False)
def page_asset(name: str) -> Response[bytes]:
    """The page's script and style sheet."""
    if name not in ASSETS:
        raise refusal(
            HTTPStatus.NOT_FOUND, f"no asset {name[:80]!r}; the page's are {', '.join(ASSETS)}"
        )
    return Response((STATIC_DIR / name).read_bytes(), media_type=ASSETS[name])


PAGE_ROUTES = [labelling_page, page_asset]
