"""Shared preprocessing: image bytes → the tensor the manifest describes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.errors import InvalidImageError
from models.manifest import InputSpec
from models.preprocessing import decode_image, preprocess, uint8_to_array

RGB_SPEC = InputSpec(height=8, width=8, channels=3, color_mode="RGB",
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
GREY_SPEC = InputSpec(height=8, width=8, channels=1, color_mode="L", mean=(0.5,), std=(0.5,))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP", "GIF"])
def test_lossless_formats_give_the_array_path_result(fmt: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    from_file = preprocess(encode(Image.fromarray(pixels), fmt), GREY_SPEC)
    np.testing.assert_array_equal(from_file, uint8_to_array(pixels, GREY_SPEC))
    assert from_file.shape == (1, 8, 8) and from_file.dtype == np.float32


def test_normalisation_follows_the_spec() -> None:
    image = Image.new("RGB", (8, 8), (255, 0, 128))
    tensor = preprocess(encode(image, "PNG"), RGB_SPEC)
    expected = (np.array([1.0, 0.0, 128 / 255]) - RGB_SPEC.mean) / RGB_SPEC.std
    np.testing.assert_allclose(tensor[:, 0, 0], expected, rtol=1e-6)


def test_colour_and_size_are_converted() -> None:
    tensor = preprocess(encode(Image.new("RGBA", (32, 20), (10, 20, 30, 255)), "PNG"), GREY_SPEC)
    assert tensor.shape == (1, 8, 8)
    rgb = preprocess(encode(Image.new("L", (3, 3), 200), "JPEG"), RGB_SPEC)
    assert rgb.shape == (3, 8, 8)


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert preprocess(buffer.getvalue(), GREY_SPEC).max() == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty body"),
        (b"definitely not an image", "not a decodable image"),
        (encode(Image.effect_noise((64, 64), 50), "PNG")[:-200], "corrupt or truncated"),
    ],
)
def test_bad_bytes_name_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        preprocess(data, GREY_SPEC)


def test_pixel_limit_refuses_decompression_bombs() -> None:
    big = encode(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(InvalidImageError, match="over the limit"):
        decode_image(big, max_pixels=1_000_000)
    assert decode_image(big, max_pixels=4_000_000).size == (2000, 2000)
