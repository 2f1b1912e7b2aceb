"""The service's errors; `service.problems` maps each kind to its HTTP status in one table."""

from __future__ import annotations

from models.errors import HalflabelError


class BadInputError(HalflabelError):
    """A request body or tensor that cannot be read as the route says (400)."""


class UnsupportedMediaTypeError(HalflabelError):
    """A Content-Type the route does not take (415)."""


class TooManyInputsError(HalflabelError):
    """One request carries more inputs than the queue can ever hold (413)."""


class ServerBusyError(HalflabelError):
    """The batching queue is full: the client should retry later (503)."""


class BatcherClosedError(HalflabelError):
    """The batcher stopped taking inputs (its model was replaced); submit to the new one (503)."""


class RequestTimeoutError(HalflabelError):
    """A request took longer than the configured timeout (504)."""


class ClientGoneError(HalflabelError):
    """The client disconnected before its answer; its work was dropped (499, never sent)."""


class DeviceUnavailableError(HalflabelError):
    """A GPU was asked for but ONNX Runtime cannot use one (at start-up)."""


class ExposureError(HalflabelError):
    """The service would listen beyond loopback with no API keys (at start-up)."""
