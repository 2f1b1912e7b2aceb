"""Training data: built-in sets and image folders, turned into model inputs by models.preprocessing.

Every image becomes its tensor through the same functions the service uses, so a model sees at
serving time exactly what it saw in training. Augmentation happens later, on those tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.errors import InvalidImageError
from models.manifest import InputSpec
from models.preprocessing import decode_image, image_to_array, uint8_to_array
from trainer.errors import DataError

log = logging.getLogger(__name__)

BUILT_IN = ("digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
DIGITS_TEST_FRACTION = 0.25
# Without a budget, built-in sets keep this many labels per class (the rest is unlabeled).
DEFAULT_LABELS_PER_CLASS = {"digits": 5, "fashion-mnist": 10}
# Without pretrained weights a folder keeps its images' typical side up to this: past it a
# CPU fit slows by the square of the side, and small-image networks gain little.
FOLDER_SIZE_CAP = 64
SIZE_SAMPLE = 200  # images whose sides set a folder's input size, evenly spaced over it
# ImageNet statistics, so pretrained weights see the inputs they were trained on.
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_STATS = (0.449, 0.226)
# Pixel mean and std of the built-in training sets, measured once.
DIGITS_STATS = (0.305, 0.376)
FASHION_STATS = (0.286, 0.353)


@dataclass(frozen=True)
class ImageSet:
    """Model inputs (N, C, H, W) float32 and their class indices (N,), -1 where unknown."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    """A few labeled images, many unlabeled ones, and optionally a test split.

    `unlabeled_truth` holds the hidden labels of the unlabeled pool when the source knows them;
    the pipeline never trains on them, it only reports how accurate its pseudo-labels were.
    """

    source: str
    classes: tuple[str, ...]
    spec: InputSpec
    labeled: ImageSet
    unlabeled: np.ndarray
    test: ImageSet | None = None
    unlabeled_truth: np.ndarray | None = None
    skipped: tuple[str, ...] = ()
    size_reason: str = "the set's native size"  # why the inputs are spec.height x spec.width

    def fingerprint(self) -> str:
        """sha256 over the training inputs and labels."""
        digest = hashlib.sha256()
        for array in (self.labeled.images, self.labeled.labels, self.unlabeled):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def load_dataset(
    source: str,
    *,
    labels_per_class: int | None = None,
    labeled_fraction: float | None = None,
    seed: int = 0,
    data_dir: Path | None = None,
    image_size: int | None = None,
    trained_size: int | None = None,
    spec: InputSpec | None = None,
    progress: bool = True,
) -> Dataset:
    """Load `digits`, `fashion-mnist` or an image folder, keeping a seeded label budget.

    The budget picks `labels_per_class` (or `labeled_fraction`) of the training labels; the rest
    of the training split becomes unlabeled. The test split is never touched. Images are
    `image_size` pixels a side when given; else built-in sets keep their own and a folder's
    are sized by `folder_image_size` (`trained_size`: the side pretrained weights saw). `spec`
    replaces the source's own input spec (to evaluate a published model on its own terms).
    """
    if labels_per_class is not None and labeled_fraction is not None:
        raise DataError("give either --labels-per-class or --labeled-fraction, not both")
    if labeled_fraction is None:
        labels_per_class = labels_per_class or DEFAULT_LABELS_PER_CLASS.get(source)
    budget = _Budget(labels_per_class, labeled_fraction, seed)
    if source == "digits":
        dataset = _load_digits(budget, spec or _grey_spec(image_size or 8, DIGITS_STATS), progress)
    elif source == "fashion-mnist":
        dataset = _load_fashion_mnist(budget, data_dir or FASHION_MNIST_DIR,
                                      spec or _grey_spec(image_size or 28, FASHION_STATS),
                                      progress)
    elif Path(source).is_dir():
        dataset = _load_folder(Path(source), budget, spec, image_size, trained_size, progress)
    else:
        raise DataError(
            f"data {source!r} is neither a built-in set ({', '.join(BUILT_IN)}) nor a folder; "
            "give one of those or a folder with labeled/<class>/ images"
        )
    if spec is not None:
        return replace(dataset, size_reason="the given input spec")
    if image_size is not None:
        return replace(dataset, size_reason="--image-size")
    return dataset  # sized by its source


def folder_image_size(files: Sequence[Path], trained_size: int | None) -> tuple[int, str]:
    """The side a folder's images are resized to, and why: the side pretrained weights were
    trained at, else the median shorter side of a sample of the images, at most
    FOLDER_SIZE_CAP (photos shrink; 8x8 digits are not blown up 16-fold)."""
    if trained_size is not None:
        return trained_size, "the size the weights were trained at"
    sides = []
    for path in files[::max(1, len(files) // SIZE_SAMPLE)]:
        try:
            with Image.open(path) as image:  # reads the header, not the pixels
                sides.append(min(image.size))
        except (OSError, SyntaxError, ValueError):
            continue  # unreadable: the reader reports it
    median = int(np.median(sides)) if sides else FOLDER_SIZE_CAP
    if median > FOLDER_SIZE_CAP:
        return FOLDER_SIZE_CAP, (f"the images' median shorter side, {median}, capped at "
                                 f"{FOLDER_SIZE_CAP} without pretrained weights")
    return median, "median of the images' shorter side"


def _grey_spec(size: int, stats: tuple[float, float]) -> InputSpec:
    return InputSpec(height=size, width=size, channels=1, color_mode="L",
                     mean=(stats[0],), std=(stats[1],))


@dataclass(frozen=True)
class _Budget:
    labels_per_class: int | None
    labeled_fraction: float | None
    seed: int

    def split(self, labels: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Indices (labeled, unlabeled) of `labels` under this budget, stratified by class."""
        rng = np.random.default_rng(self.seed)
        picked = []
        for index, name in enumerate(classes):
            members = np.flatnonzero(labels == index)
            wanted = self._wanted(len(members))
            if len(members) == 0:
                raise DataError(f"class {name!r} has no labeled image; add some or remove it")
            if wanted > len(members):
                raise DataError(
                    f"class {name!r} has only {len(members)} labeled images but the budget asks "
                    f"for {wanted}; lower --labels-per-class"
                )
            picked.append(rng.choice(members, size=wanted, replace=False))
        labeled = np.sort(np.concatenate(picked))
        unlabeled = np.setdiff1d(np.arange(len(labels)), labeled)
        return labeled, unlabeled

    def _wanted(self, available: int) -> int:
        if self.labels_per_class is not None:
            return self.labels_per_class
        if self.labeled_fraction is not None:
            return max(1, round(available * self.labeled_fraction))
        return available


def _arrays_to_inputs(pixels: np.ndarray, spec: InputSpec, what: str, progress: bool) -> np.ndarray:
    images = tqdm(pixels, desc=f"preprocess {what}", unit="img", disable=not progress, leave=False)
    return _stack([uint8_to_array(image, spec) for image in images], spec)


def _stack(arrays: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    if not arrays:
        return np.zeros((0, spec.channels, spec.height, spec.width), np.float32)
    return np.stack(arrays)


def _from_arrays(
    source: str,
    classes: tuple[str, ...],
    spec: InputSpec,
    pool: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    budget: _Budget,
    progress: bool,
) -> Dataset:
    pixels, labels = pool
    labeled, unlabeled = budget.split(labels, classes)
    return Dataset(
        source=source,
        classes=classes,
        spec=spec,
        labeled=ImageSet(_arrays_to_inputs(pixels[labeled], spec, "labeled", progress),
                         labels[labeled]),
        unlabeled=_arrays_to_inputs(pixels[unlabeled], spec, "unlabeled", progress),
        test=ImageSet(_arrays_to_inputs(test[0], spec, "test", progress), test[1]),
        unlabeled_truth=labels[unlabeled],
    )


def _load_digits(budget: _Budget, spec: InputSpec, progress: bool) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    # sklearn ships no test split: a fixed one, independent of --seed, so runs compare.
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=labels
    )
    classes = tuple(str(d) for d in range(10))
    return _from_arrays("digits", classes, spec, (train_x, train_y), (test_x, test_y), budget,
                        progress)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _load_fashion_mnist(
    budget: _Budget, directory: Path, spec: InputSpec, progress: bool
) -> Dataset:
    names = {
        split: (directory / f"{stem}-images-idx3-ubyte.gz",
                directory / f"{stem}-labels-idx1-ubyte.gz")
        for split, stem in (("train", "train"), ("test", "t10k"))
    }
    missing = [str(p) for pair in names.values() for p in pair if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found ({missing[0]} is missing); install it with "
            "'apt-get install dataset-fashion-mnist' or point --data-dir at a folder with the "
            "four *-ubyte.gz files"
        )
    train, test = (
        (_read_idx(images), _read_idx(labels).astype(np.int64))
        for images, labels in names.values()
    )
    return _from_arrays("fashion-mnist", FASHION_MNIST_CLASSES, spec, train, test, budget,
                        progress)


def _load_folder(
    root: Path, budget: _Budget, spec: InputSpec | None, image_size: int | None,
    trained_size: int | None, progress: bool,
) -> Dataset:
    labeled_dir = root / "labeled"
    classes = tuple(sorted(p.name for p in labeled_dir.iterdir() if p.is_dir())) if (
        labeled_dir.is_dir()) else ()
    if len(classes) < 2:
        raise DataError(
            f"{labeled_dir} needs at least two class folders (labeled/<class>/<image>); "
            f"found {len(classes)}"
        )
    labeled_files = [(f, i) for i, c in enumerate(classes) for f in _files(labeled_dir / c)]
    test_dir = root / "test"
    test_files = [(f, classes.index(c.name)) for c in _subdirs(test_dir) if c.name in classes
                  for f in _files(c)]
    unlabeled_files = [(f, -1) for f in _files(root / "unlabeled")]
    pool_files = [f for f, _ in labeled_files + unlabeled_files]
    size_reason = ""  # load_dataset names the spec or size it was given
    if spec is None:
        size = image_size
        if size is None:
            size, size_reason = folder_image_size(pool_files, trained_size)
        spec = _folder_spec(pool_files, size)

    reader = _FolderReader(spec, progress)
    pool = reader.read(labeled_files, "labeled")
    extra = reader.read(unlabeled_files, "unlabeled")
    test = reader.read(test_files, "test") if test_files else None
    if reader.skipped:
        log.warning("skipped %d unreadable images: %s", len(reader.skipped),
                    ", ".join(reader.skipped))

    labeled_idx, rest = budget.split(pool.labels, classes)
    return Dataset(
        source=str(root),
        classes=classes,
        spec=spec,
        labeled=ImageSet(pool.images[labeled_idx], pool.labels[labeled_idx]),
        unlabeled=np.concatenate([pool.images[rest], extra.images]),
        test=test,
        unlabeled_truth=np.concatenate([pool.labels[rest], extra.labels]),
        skipped=tuple(reader.skipped),
        size_reason=size_reason,
    )


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file())


def _folder_spec(files: Iterable[Path], size: int) -> InputSpec:
    """Grayscale when every readable image is, colour otherwise."""
    for path in files:
        try:
            with Image.open(path) as image:
                if image.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return InputSpec(height=size, width=size, channels=3, color_mode="RGB",
                                     mean=RGB_MEAN, std=RGB_STD)
        except (OSError, SyntaxError, ValueError):
            continue  # unreadable: the reader reports it
    return _grey_spec(size, GREY_STATS)


class _FolderReader:
    """Decodes image files with models.preprocessing, collecting the ones that fail."""

    def __init__(self, spec: InputSpec, progress: bool) -> None:
        self.spec = spec
        self.progress = progress
        self.skipped: list[str] = []

    def read(self, files: list[tuple[Path, int]], what: str) -> ImageSet:
        images, labels = [], []
        for path, label in tqdm(files, desc=f"read {what}", unit="img",
                                disable=not self.progress, leave=False):
            try:
                images.append(image_to_array(decode_image(path.read_bytes()), self.spec))
                labels.append(label)
            except (InvalidImageError, OSError) as exc:
                self.skipped.append(f"{path} ({exc})")
        return ImageSet(_stack(images, self.spec), np.asarray(labels, dtype=np.int64))
