"""The trainer's accuracy protocol: K label splits, the pipeline and its baselines in one run.

    nice -n 10 .venv/bin/python benchmarks/trainer_accuracy.py --data digits --labels-per-class 5

For each of `--splits` label splits (seeds 1000, 1001, ...: fixed here, never tuned on), on the
same labeled images and the same official test split:
- halflabel: the default pipeline (settings from HALFLABEL_TRAIN_* variables, as `fit` reads
  them), published to a scratch repository and scored by ONNX Runtime on the exported model
  (what the service serves); beside it the test accuracy its first spreading round left, and
  how many stages were rolled back;
- supervised: the same network trained on the labeled images only, as many steps in all;
- scikit-learn LabelSpreading on pixels (rbf, gamma 0.25 in digits' 0-16 units, up to 5,000
  images; its dense kernel cannot go further, so knn k=7 beyond);
- the project's LabelSpreading on pixels, spreading and Poisson, with the first round's graph.
Prints each split, then the mean, standard deviation and worst split of every method.
`--image-size` and `--unlabeled-limit` (a seeded subsample of the pool) scale a run down;
`--method` (repeatable) runs only the methods named (e.g. leave out `supervised`, which trains
the network a second time).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from models.repository import ModelRepository
from trainer.config import TrainConfig
from trainer.data import Dataset, load_dataset
from trainer.label_spreading import LabelSpreading
from trainer.pipeline import run_pipeline
from trainer.publish import export_and_publish

console = Console()
FIRST_SEED = 1000
DENSE_KERNEL_LIMIT = 5000
DIGITS_RBF_GAMMA = 0.25 * 16**2  # scikit-learn's example's gamma, for pixels in 0..1

Scores = dict[str, float]


def halflabel(dataset: Dataset, config: TrainConfig) -> Scores:
    trained = run_pipeline(dataset, config)
    for stage in trained.stages:
        console.print(f"  {stage.name}: {stage.steps} steps, {stage.seconds:.0f} s, "
                      f"test {stage.test_accuracy:.2%}")
    first_round = next(s for s in trained.stages if s.name.startswith("label-spreading"))
    with tempfile.TemporaryDirectory() as scratch:
        artifact = export_and_publish(trained, ModelRepository(Path(scratch)), "bench")
    return {"halflabel": artifact.manifest.metrics.accuracy,
            "halflabel, first spreading round": first_round.test_accuracy or 0.0,
            "stages rolled back": float(sum(not s.kept for s in trained.stages))}


def supervised(dataset: Dataset, config: TrainConfig) -> Scores:
    total = config.supervised.steps + config.pseudo.steps + config.refine.steps
    only_labels = config.model_copy(update={
        "supervised": config.supervised.model_copy(update={"steps": total}),
        "spreading": config.spreading.model_copy(update={"enabled": False}),
        "refine": config.refine.model_copy(update={"steps": 0}),
        "pretrain": config.pretrain.model_copy(update={"steps": 0})})
    return {"supervised, same labels": run_pipeline(dataset, only_labels).stages[-1].test_accuracy
            or 0.0}


def _pixels(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training pixels (labeled, then unlabeled) in 0..1, their labels (-1: unlabeled), test."""
    assert dataset.test is not None
    mean, std = np.asarray(dataset.spec.mean), np.asarray(dataset.spec.std)

    def raw(images: np.ndarray) -> np.ndarray:
        return (images * std[:, None, None] + mean[:, None, None]).reshape(len(images), -1)

    train = np.concatenate([raw(dataset.labeled.images), raw(dataset.unlabeled)])
    targets = np.concatenate([dataset.labeled.labels, np.full(len(dataset.unlabeled), -1)])
    return train, targets, raw(dataset.test.images)


def sklearn_label_spreading(dataset: Dataset, config: TrainConfig) -> Scores:
    from sklearn.semi_supervised import LabelSpreading as SklearnLabelSpreading

    train, targets, test = _pixels(dataset)
    if len(train) <= DENSE_KERNEL_LIMIT:
        name, model = "sklearn LabelSpreading (rbf)", SklearnLabelSpreading(
            kernel="rbf", gamma=DIGITS_RBF_GAMMA, max_iter=1000)
    else:
        name, model = "sklearn LabelSpreading (knn, k=7)", SklearnLabelSpreading(
            kernel="knn", n_neighbors=7, max_iter=100)
    model.fit(train, targets)
    return {name: float(np.mean(model.predict(test) == dataset.test.labels))}  # type: ignore[union-attr]


def own_label_spreading(dataset: Dataset, config: TrainConfig) -> Scores:
    """Over centred pixels with the first spreading round's graph (cosine, sim**pixel_gamma)."""
    train, targets, test = _pixels(dataset)
    centre = train.mean(axis=0)
    settings = config.spreading
    scores = {}
    for method in ("spreading", "poisson"):
        model = LabelSpreading(n_neighbors=settings.neighbors, alpha=settings.alpha,
                               method=method, gamma=settings.pixel_gamma)
        model.fit(train - centre, targets)
        predicted = model.predict(test - centre)
        scores[f"halflabel LabelSpreading ({method}) on pixels"] = float(
            np.mean(predicted == dataset.test.labels))  # type: ignore[union-attr]
    return scores


METHODS: tuple[Callable[[Dataset, TrainConfig], Scores], ...] = (
    halflabel, supervised, sklearn_label_spreading, own_label_spreading)


def load_split(data: str, labels_per_class: int, seed: int, image_size: int | None,
               unlabeled_limit: int | None) -> Dataset:
    dataset = load_dataset(data, labels_per_class=labels_per_class, seed=seed,
                           image_size=image_size, progress=False)
    if unlabeled_limit is None or unlabeled_limit >= len(dataset.unlabeled):
        return dataset
    keep = np.random.default_rng(seed).choice(len(dataset.unlabeled), unlabeled_limit,
                                              replace=False)
    truth = dataset.unlabeled_truth
    return replace(dataset, unlabeled=dataset.unlabeled[keep],
                   unlabeled_truth=None if truth is None else truth[keep])


def main(
    data: Annotated[str, typer.Option()] = "digits",
    labels_per_class: Annotated[int, typer.Option()] = 5,
    splits: Annotated[int, typer.Option(min=1)] = 5,
    image_size: Annotated[int | None, typer.Option()] = None,
    unlabeled_limit: Annotated[int | None, typer.Option()] = None,
    method: Annotated[list[str] | None, typer.Option(
        help=f"Run only these ({', '.join(m.__name__ for m in METHODS)})")] = None,
) -> None:
    """Print every method's test accuracy on each split, then their mean, spread and worst."""
    import torch  # after trainer, which sets OpenMP's wait policy before torch loads

    logging.basicConfig(format="  %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)  # the budget's plan
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
                  f"torch {torch.__version__}, CUDA: "
                  f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    chosen = [m for m in METHODS if method is None or m.__name__ in method]
    unknown = set(method or ()) - {m.__name__ for m in METHODS}
    if unknown or not any(m is halflabel for m in chosen):
        raise typer.BadParameter(f"--method takes {', '.join(m.__name__ for m in METHODS)}, "
                                 "halflabel among them")
    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    for seed in range(FIRST_SEED, FIRST_SEED + splits):
        dataset = load_split(data, labels_per_class, seed, image_size, unlabeled_limit)
        config = TrainConfig(seed=seed, progress=False)
        console.print(f"split {seed}: {data} at {dataset.spec.height}x{dataset.spec.width}, "
                      f"{len(dataset.labeled)} labels, {len(dataset.unlabeled)} unlabeled, "
                      f"{len(dataset.test) if dataset.test else 0} test")
        for run in chosen:
            split_started = time.perf_counter()
            scores = run(dataset, config)
            for name, value in scores.items():
                results.setdefault(name, []).append(value)
                console.print(f"  {name}: {value:.4g}")
            console.print(f"  ({run.__name__}: {time.perf_counter() - split_started:.0f} s)")
    console.print(summary(results, f"{data}, {labels_per_class} labels per class, "
                          f"{splits} splits, {time.perf_counter() - started:.0f} s in all"))
    below = sum(a < b for a, b in zip(results["halflabel"],
                                      results["halflabel, first spreading round"], strict=True))
    console.print(f"splits where the fit ended below its first spreading round: {below}")


def summary(results: dict[str, list[float]], title: str) -> Table:
    table = Table(title=title)
    for column in ("method", "mean", "std", "worst", "splits"):
        table.add_column(column)
    for name, values in results.items():
        if name == "stages rolled back":
            table.add_row(name, f"{np.mean(values):.1f}", "", f"{max(values):.0f}",
                          " ".join(f"{v:.0f}" for v in values))
            continue
        table.add_row(name, f"{np.mean(values):.2%}", f"{np.std(values):.2%}",
                      f"{min(values):.2%}", " ".join(f"{v:.1%}" for v in values))
    return table


if __name__ == "__main__":
    typer.run(main)
