"""Input tensors → model inputs, and the PNG that stands for each one in the labelling queue.

FP32 tensors are preprocessed already, shaped [N, C, H, W] as the manifest says; UINT8 tensors
are raw pixels [N, H, W] or [N, H, W, C] of any size, resized and normalised like image files.
"""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from models.manifest import InputSpec
from models.preprocessing import uint8_to_array
from service.errors import BadInputError
from service.predictor import ImageFile, ModelInput

DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
"""The datatypes an input may have, as little-endian numpy types (the binary extension's)."""
PIXEL_CHANNELS = (1, 3, 4)


def check_shape(shape: list[int]) -> int:
    """The number of elements of `shape`; BadInputError for a zero or negative dimension."""
    if any(dim < 1 for dim in shape):
        raise BadInputError(
            f"shape {shape} has an empty or negative dimension; send at least one input "
            "and every dimension >= 1"
        )
    return int(np.prod(shape, dtype=object))


def model_inputs(values: np.ndarray, datatype: str, spec: InputSpec) -> list[ModelInput]:
    """One model input per tensor row; each renders its PNG only if it is queued."""
    if datatype == "UINT8":
        pixels = _pixels(values)
        return [ModelInput(uint8_to_array(one, spec), partial(_png, one)) for one in pixels]
    expected = [spec.channels, spec.height, spec.width]
    if values.ndim != 4 or list(values.shape[1:]) != expected:
        raise BadInputError(f"FP32 input must be shaped [N, {', '.join(map(str, expected))}]")
    if not np.isfinite(values).all():
        raise BadInputError(
            "FP32 input holds NaN, infinity or values beyond float32's range; "
            "send finite preprocessed pixels"
        )
    return [ModelInput(array, partial(_preprocessed_png, array, spec)) for array in values]


def _pixels(values: np.ndarray) -> np.ndarray:
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim not in (3, 4) or (values.ndim == 4 and values.shape[3] not in PIXEL_CHANNELS):
        raise BadInputError("UINT8 input must be pixels shaped [N, H, W] or [N, H, W, C], C 1/3/4")
    return values


def _preprocessed_png(array: np.ndarray, spec: InputSpec) -> ImageFile:
    """A PNG of the pixels a preprocessed (C, H, W) array was made from (the manifest's
    mean and std undone)."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    pixels = np.clip(np.rint((array * std + mean) * 255), 0, 255).astype(np.uint8)
    pixels = pixels.transpose(1, 2, 0)
    return _png(pixels[..., 0] if spec.channels == 1 else pixels)


def _png(pixels: np.ndarray) -> ImageFile:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ImageFile(buffer.getvalue(), "image/png")
