"""Shared preprocessing: image bytes → the tensor the manifest describes."""

from __future__ import annotations

import io
import struct
import zlib

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


def png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG, written by hand: Pillow reads these but cannot write them."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def digit_like(size: int) -> np.ndarray:
    """8-bit grey pixels with every level in use."""
    return np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)


def unnormalise(tensor: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The 0..1 pixels a tensor was made from."""
    return tensor * np.asarray(spec.std)[:, None, None] + np.asarray(spec.mean)[:, None, None]


def test_a_16_bit_png_means_what_the_same_picture_in_8_bits_means() -> None:
    pixels = digit_like(8)
    deep = encode(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(deep)).mode == "I;16"
    for spec in (GREY_SPEC, RGB_SPEC):
        np.testing.assert_allclose(preprocess(deep, spec), uint8_to_array(pixels, spec),
                                   atol=1e-5)


def test_16_bit_levels_above_255_are_scaled_not_clipped() -> None:
    levels = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    pixels = unnormalise(preprocess(encode(Image.fromarray(levels), "PNG"), GREY_SPEC), GREY_SPEC)
    np.testing.assert_allclose(pixels[0], levels / 65535, atol=1e-6)
    assert len(np.unique(pixels)) == 64  # `convert("L")` made all but the first 1.0


def test_16_bit_images_are_resized_in_floating_point() -> None:
    pixels = digit_like(32)
    deep = preprocess(encode(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG"), GREY_SPEC)
    shallow = preprocess(encode(Image.fromarray(pixels), "PNG"), GREY_SPEC)
    assert deep.shape == shallow.shape == (1, 8, 8)
    np.testing.assert_allclose(deep, shallow, atol=1 / 255 / GREY_SPEC.std[0])


def test_a_16_bit_rgb_png_keeps_its_high_byte() -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 40000, 1000, 65535
    tensor = unnormalise(preprocess(png_16bit_rgb(pixels), RGB_SPEC), RGB_SPEC)
    np.testing.assert_allclose(tensor[:, 0, 0], [40000 / 65535, 1000 / 65535, 1.0], atol=1 / 255)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.full((8, 8), 2**30, dtype=np.int32), 0.5),  # 'I': 32-bit integers, full scale 2^31-1
        (np.full((8, 8), 0.25, dtype=np.float32), 0.25),  # 'F': floats, in 0..1
        (np.full((8, 8), 7.0, dtype=np.float32), 1.0),  # beyond full scale: clipped
    ],
)
def test_32_bit_integer_and_float_tiffs_are_scaled(values: np.ndarray, expected: float) -> None:
    tiff = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode in ("I", "F")
    for spec in (GREY_SPEC, RGB_SPEC):
        pixels = unnormalise(preprocess(tiff, spec), spec)
        np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_non_finite_pixels_are_refused() -> None:
    values = np.zeros((8, 8), dtype=np.float32)
    values[3, 3] = np.nan
    with pytest.raises(InvalidImageError, match="NaN or infinite"):
        preprocess(encode(Image.fromarray(values), "TIFF"), GREY_SPEC)


def test_palette_with_transparency_gives_its_colours() -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 128] + [0] * 762)
    data = io.BytesIO()
    palette.save(data, format="PNG", transparency=1)  # colour 1 fully transparent
    tensor = unnormalise(preprocess(data.getvalue(), RGB_SPEC), RGB_SPEC)
    np.testing.assert_allclose(tensor[:, 0, 0], [1.0, 0.0, 128 / 255], atol=1e-6)
    grey = unnormalise(preprocess(data.getvalue(), GREY_SPEC), GREY_SPEC)
    luma = (255 * 299 + 128 * 114) / 1000 / 255  # ITU-R 601-2, as Pillow's convert("L")
    assert grey[0, 0, 0] == pytest.approx(luma, abs=1 / 255)
