"""Bounds on decoding work across requests, decided before the work starts."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator

from PIL import Image

from service import metrics
from service.errors import ServerBusyError


class PixelBudget:
    """How many pixels are being decoded at once, across requests.

    A request that would take it over the limit is refused (503) instead of waiting behind
    the others' decoding; one is always let in when nothing else decodes, so a request larger
    than the limit still runs, alone. Thread-safe: decoding runs on threads.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget while decoding; ServerBusyError when they do not fit."""
        with self._lock:
            if self._in_flight and self._in_flight + pixels > self.limit:
                metrics.DECODES_REFUSED.inc()
                raise ServerBusyError(
                    f"{self._in_flight} pixels are being decoded, {pixels} more would pass "
                    "HALFLABEL_MAX_PIXELS_IN_FLIGHT; retry after a short wait"
                )
            self._in_flight += pixels
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= pixels


def image_pixels(data: bytes) -> int:
    """Width x height from an image file's header (0 when it has none: decoding will say why)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # not an image; the decoder raises the error the client should see
        return 0
    return width * height
