"""The service turns a file into exactly the tensor the trainer made from it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import LiveService
from PIL import Image

from models.manifest import InputSpec
from service.predictor import decode_for_model
from trainer.data import load_dataset

RGB_SPEC = InputSpec(height=12, width=12, channels=3, color_mode="RGB",
                     mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
GREY_SPEC = InputSpec(height=8, width=8, channels=1, color_mode="L", mean=(0.5,), std=(0.25,))


def varied_images() -> dict[str, bytes]:
    """Files in every accepted format and several modes and sizes."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (9, 17, 4), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8))
    deep = Image.fromarray(rng.integers(0, 2**16, (14, 10), dtype=np.uint16))
    palette_alpha = rgb.convert("P")
    palette_alpha.info["transparency"] = 0  # PNG writes it as a tRNS chunk
    cases = {
        "rgb.png": (rgb, "PNG"), "rgba.png": (rgba, "PNG"), "grey.png": (grey, "PNG"),
        "rgb.jpg": (rgb, "JPEG"), "rgb.webp": (rgb, "WEBP"), "rgb.bmp": (rgb, "BMP"),
        "palette.gif": (rgb.convert("P"), "GIF"), "grey16.png": (deep, "PNG"),
        "grey16.tif": (deep, "TIFF"), "palette-alpha.png": (palette_alpha, "PNG"),
        "int32.tif": (Image.fromarray(rng.integers(0, 2**31, (9, 9), dtype=np.int32)), "TIFF"),
        "float.tif": (Image.fromarray(rng.random((11, 7), dtype=np.float32)), "TIFF"),
    }
    files = {}
    for name, (image, fmt) in cases.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files[name] = buffer.getvalue()
    return files


def test_service_and_trainer_make_the_same_tensors(tmp_path: Path) -> None:
    files = varied_images()
    for class_name in ("a", "b"):  # the trainer wants two classes; the files go in 'test/a'
        (tmp_path / "labeled" / class_name).mkdir(parents=True)
        (tmp_path / "labeled" / class_name / "x.png").write_bytes(files["rgb.png"])
    (tmp_path / "test" / "a").mkdir(parents=True)
    for name, data in files.items():
        (tmp_path / "test" / "a" / name).write_bytes(data)
    for spec in (RGB_SPEC, GREY_SPEC):
        dataset = load_dataset(str(tmp_path), spec=spec, progress=False)
        assert dataset.test is not None and len(dataset.test) == len(files)
        order = sorted(files)  # the trainer reads a class folder in name order
        served = np.stack([decode_for_model(files[name], spec, 10**6)[0] for name in order])
        assert served.shape == (len(files), spec.channels, spec.height, spec.width)
        np.testing.assert_array_equal(served, dataset.test.images)


def test_a_16_bit_png_is_served_like_the_same_picture_in_8_bits(live_service: LiveService) -> None:
    level = 200  # 'light' for the tiny model; clipped to 8 bits, 51400 would be pure white
    shallow, deep = io.BytesIO(), io.BytesIO()
    Image.new("L", (4, 4), level).save(shallow, format="PNG")
    Image.fromarray(np.full((4, 4), level * 257, dtype=np.uint16)).save(deep, format="PNG")
    with live_service.client() as http:
        answers = [http.post("/v1/predict", content=image.getvalue(),
                             headers={"Content-Type": "image/png"}).json()["predictions"][0]
                   for image in (shallow, deep)]
    assert answers[0]["label"] == answers[1]["label"] == "light"
    assert answers[1]["confidence"] == pytest.approx(answers[0]["confidence"], abs=1e-6)
