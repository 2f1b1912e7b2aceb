"""Image bytes → model input, exactly as a manifest's InputSpec says.

The trainer and the service both call these functions, so a model sees the same tensor for
the same file at training and at serving time.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.errors import InvalidImageError
from models.manifest import InputSpec

DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Modes of more than 8 bits per pixel (16-bit PNG and TIFF, 32-bit integer and float TIFF), all
# grey in Pillow, and the value that is full brightness in each: pixels are divided by it, so a
# 16-bit file means what the same picture in 8 bits means. Floats are taken to be in 0..1.
HIGH_DEPTH_FULL_SCALE = {
    "I;16": 2**16 - 1, "I;16B": 2**16 - 1, "I;16L": 2**16 - 1, "I;16N": 2**16 - 1,
    "I": 2**31 - 1, "F": 1.0,
}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP/BMP/GIF/TIFF bytes (first frame), refusing decompression bombs."""
    if not data:
        raise InvalidImageError("empty body: send the image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels}; send a smaller image"
                )
            image.seek(0)
            image.load()
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImageError(
            "body is not a decodable image; send PNG, JPEG, WebP, BMP, GIF or TIFF bytes"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"image is corrupt or truncated: {exc}") from None
    return image


def image_to_array(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """A PIL image → normalised float32 array of shape (channels, height, width)."""
    if image.mode in HIGH_DEPTH_FULL_SCALE:
        pixels = _high_depth_pixels(image, spec)
    else:
        pixels = _eight_bit_pixels(image, spec)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def _eight_bit_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    if image.mode in ("P", "PA", "LA", "RGBA") and spec.color_mode == "RGB":
        image = image.convert("RGBA").convert("RGB")  # drops alpha, keeps palette colours
    image = image.convert(spec.color_mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def _high_depth_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Scaled to 0..1 and resized in floating point: converting to 8 bits would clip them."""
    values = np.asarray(image, dtype=np.float32)
    if not np.isfinite(values).all():
        raise InvalidImageError("image has NaN or infinite pixels; send finite values")
    grey = Image.fromarray(np.clip(values / HIGH_DEPTH_FULL_SCALE[image.mode], 0, 1))
    if grey.size != (spec.width, spec.height):
        grey = grey.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.float32)
    return np.repeat(pixels[:, :, None], 3, axis=2) if spec.color_mode == "RGB" else pixels


def preprocess(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes → normalised float32 array of shape (channels, height, width)."""
    return image_to_array(decode_image(data, max_pixels), spec)


def uint8_to_array(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Raw uint8 pixels (H, W) or (H, W, C) → the model input, via the same path as files."""
    return image_to_array(Image.fromarray(pixels), spec)
