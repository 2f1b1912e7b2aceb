"""Trainer errors shown to users as one line (the CLI prints them without a traceback)."""

from models.errors import HalflabelError


class DataError(HalflabelError):
    """The training data is missing, empty, or cannot give the requested label budget."""


class WeightsError(HalflabelError):
    """Pretrained weights were asked for but cannot be found or do not fit the backbone."""


class ExportError(HalflabelError):
    """The exported ONNX model does not match the PyTorch model; nothing was published."""


class SettingsError(HalflabelError):
    """A setting that cannot be honoured here, e.g. a CUDA device on a machine without one."""
