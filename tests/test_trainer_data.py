"""Training data: preprocessing parity with the service, label budgets, bad images."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import preprocess
from trainer.data import FOLDER_SIZE_CAP, folder_image_size, load_dataset
from trainer.errors import DataError
from trainer.network import trained_image_size
from trainer.pipeline import split_held_out

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP"}


def write_image(path: Path, mode: str, seed: int, size: tuple[int, int] = (20, 14)) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"L": (size[1], size[0]), "RGB": (size[1], size[0], 3)}[mode]
    image = Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=FORMATS[path.suffix[1:]])
    return path


def image_folder(root: Path, mode: str = "RGB", per_class: int = 3,
                 size: tuple[int, int] = (20, 14), suffixes: tuple[str, ...] = ()) -> Path:
    """labeled/{cat,dog}/, unlabeled/, test/{cat,dog}/ of `size` images, in `suffixes` or every
    format that keeps `mode`."""
    # WebP stores no greyscale
    suffixes = suffixes or tuple(s for s in FORMATS if mode == "RGB" or s != "webp")
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            suffix = suffixes[i % len(suffixes)]
            write_image(root / "labeled" / name / f"{i}.{suffix}", mode, 10 * c + i, size)
        write_image(root / "test" / name / f"t.{suffixes[c % len(suffixes)]}", mode, 100 + c,
                    size)
    for i in range(4):
        write_image(root / "unlabeled" / f"u{i}.{suffixes[i % len(suffixes)]}", mode, 200 + i,
                    size)
    return root


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_folder_images_match_the_service_preprocessing(tmp_path: Path, mode: str) -> None:
    root = image_folder(tmp_path, mode)
    dataset = load_dataset(str(root), progress=False)
    assert dataset.spec.color_mode == mode and dataset.classes == ("cat", "dog")
    files = [f for c in ("cat", "dog") for f in sorted((root / "labeled" / c).iterdir())]
    expected = np.stack([preprocess(f.read_bytes(), dataset.spec) for f in files])
    np.testing.assert_array_equal(dataset.labeled.images, expected)
    unlabeled = np.stack([preprocess(f.read_bytes(), dataset.spec)
                          for f in sorted((root / "unlabeled").iterdir())])
    np.testing.assert_array_equal(dataset.unlabeled, unlabeled)
    assert dataset.test is not None and list(dataset.test.labels) == [0, 1]


def test_built_in_arrays_match_the_service_preprocessing_of_their_png() -> None:
    from sklearn.datasets import load_digits

    dataset = load_dataset("digits", labeled_fraction=1.0, progress=False)
    # The digits test split is sklearn's, shuffled with a fixed seed: find one image by value.
    pixels = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[0]).save(buffer, format="PNG")
    served = preprocess(buffer.getvalue(), dataset.spec)
    assert dataset.test is not None
    everything = np.concatenate([dataset.labeled.images, dataset.test.images])
    assert np.any(np.all(everything == served, axis=(1, 2, 3)))


def test_corrupt_images_are_skipped_counted_and_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_folder(tmp_path)
    (root / "unlabeled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "labeled" / "cat" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(str(root), progress=False)
    assert len(dataset.skipped) == 2
    assert len(dataset.unlabeled) == 4 and len(dataset.labeled) == 6
    assert "skipped 2 unreadable images" in caplog.text
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text


def test_a_class_without_images_is_named(tmp_path: Path) -> None:
    root = image_folder(tmp_path)
    (root / "labeled" / "bird").mkdir()
    with pytest.raises(DataError, match="class 'bird' has no labeled image"):
        load_dataset(str(root), progress=False)


def test_budget_is_seeded_stratified_and_keeps_the_test_split() -> None:
    first = load_dataset("digits", labels_per_class=3, seed=7, progress=False)
    again = load_dataset("digits", labels_per_class=3, seed=7, progress=False)
    other = load_dataset("digits", labels_per_class=3, seed=8, progress=False)
    assert np.bincount(first.labeled.labels).tolist() == [3] * 10
    np.testing.assert_array_equal(first.labeled.images, again.labeled.images)
    assert not np.array_equal(first.labeled.images, other.labeled.images)
    assert first.test is not None and other.test is not None
    np.testing.assert_array_equal(first.test.images, other.test.images)
    assert len(first.labeled) + len(first.unlabeled) + len(first.test) == 1797
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()


def test_labeled_fraction_and_folder_budget_move_the_rest_to_unlabeled(tmp_path: Path) -> None:
    root = image_folder(tmp_path, per_class=4)
    dataset = load_dataset(str(root), labeled_fraction=0.5, progress=False)
    assert np.bincount(dataset.labeled.labels).tolist() == [2, 2]
    assert len(dataset.unlabeled) == 4 + 4
    with pytest.raises(DataError, match="not both"):
        load_dataset(str(root), labels_per_class=1, labeled_fraction=0.5, progress=False)


def test_held_out_slice_rounds_down_and_keeps_two_labels_per_class_for_training() -> None:
    for per_class, trained, held in ((1, 1, 0), (2, 2, 0), (4, 4, 0), (5, 4, 1), (10, 8, 2)):
        labeled = load_dataset("digits", labels_per_class=per_class, progress=False).labeled
        train, held_out = split_held_out(labeled, 0.2, seed=0)
        assert np.bincount(train.labels, minlength=10).tolist() == [trained] * 10
        assert np.bincount(held_out.labels, minlength=10).tolist() == [held] * 10


def test_a_folder_of_8x8_pngs_is_loaded_at_8_not_blown_up(tmp_path: Path) -> None:
    dataset = load_dataset(str(image_folder(tmp_path, "L", size=(8, 8), suffixes=("png",))),
                           progress=False)
    assert (dataset.spec.height, dataset.spec.width) == (8, 8)
    assert dataset.labeled.images.shape[2:] == (8, 8)
    assert dataset.size_reason == "median of the images' shorter side"


def test_large_images_are_shrunk_to_the_cap_and_image_size_overrides(tmp_path: Path) -> None:
    root = image_folder(tmp_path, size=(100, 80))
    capped = load_dataset(str(root), progress=False)
    assert capped.spec.height == capped.spec.width == FOLDER_SIZE_CAP < 80
    assert "median shorter side, 80, capped" in capped.size_reason
    given = load_dataset(str(root), image_size=24, progress=False)
    assert given.labeled.images.shape[2:] == (24, 24) and given.size_reason == "--image-size"
    pretrained = load_dataset(str(root), trained_size=96, progress=False)
    assert pretrained.spec.height == 96 and "weights were trained at" in pretrained.size_reason


def test_pretrained_weights_size_a_folder_at_their_training_size(tmp_path: Path) -> None:
    files = sorted((image_folder(tmp_path, size=(100, 80)) / "unlabeled").iterdir())
    assert folder_image_size(files, trained_image_size("imagenet"))[0] == 224
    assert folder_image_size(files, trained_image_size("none"))[0] == FOLDER_SIZE_CAP


def test_built_in_sets_keep_their_native_size_whatever_the_weights() -> None:
    dataset = load_dataset("digits", trained_size=224, progress=False)
    assert dataset.spec.height == 8 and dataset.size_reason == "the set's native size"
