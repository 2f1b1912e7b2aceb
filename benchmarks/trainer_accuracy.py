"""Test accuracy of the trainer against its baselines, all measured in the same run.

    nice -n 10 .venv/bin/python benchmarks/trainer_accuracy.py --data digits --labels-per-class 5

Rows, on the same labeled images (same seed) and the same official test split:
- halflabel: the full pipeline, published to a scratch repository; accuracy from ONNX Runtime on
  the exported model (what the service would serve), ECE after temperature scaling;
- supervised: the same network trained on the labeled images only, for as many steps as the
  pipeline trains in total;
- sklearn LabelSpreading (kNN kernel) on raw pixels, on the labeled + unlabeled training images.
Pass stage budgets (--supervised-steps ...), a smaller --image-size or an --unlabeled-limit
(a seeded subsample of the pool) to scale the run to the hardware.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
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
from trainer.pipeline import run_pipeline
from trainer.publish import export_and_publish

console = Console()


def halflabel(dataset: Dataset, config: TrainConfig) -> tuple[float, float | None]:
    trained = run_pipeline(dataset, config)
    for stage in trained.stages:
        console.print(f"  stage {stage.name}: {stage.seconds:.0f}s, test accuracy "
                      f"{stage.test_accuracy:.2%} {stage.details}")
    with tempfile.TemporaryDirectory() as scratch:
        artifact = export_and_publish(trained, ModelRepository(Path(scratch)), "bench")
        return artifact.manifest.metrics.accuracy, artifact.manifest.metrics.ece


def supervised(dataset: Dataset, config: TrainConfig) -> float:
    total = config.supervised.steps + config.pseudo.steps + config.refine.steps
    only_labels = TrainConfig(**{
        **config.model_dump(), "supervised": {"steps": total}, "pseudo": {"steps": 0},
        "refine": {"steps": 0}, "pretrain": {"steps": 0}})
    trained = run_pipeline(dataset, only_labels)
    return trained.stages[-1].test_accuracy or 0.0


def sklearn_label_spreading(dataset: Dataset, neighbours: int) -> float:
    from sklearn.semi_supervised import LabelSpreading

    assert dataset.test is not None
    flat = np.concatenate([dataset.labeled.images, dataset.unlabeled]).reshape(
        len(dataset.labeled) + len(dataset.unlabeled), -1)
    targets = np.concatenate([dataset.labeled.labels, np.full(len(dataset.unlabeled), -1)])
    model = LabelSpreading(kernel="knn", n_neighbors=neighbours, max_iter=100).fit(flat, targets)
    predicted = model.predict(dataset.test.images.reshape(len(dataset.test), -1))
    return float(np.mean(predicted == dataset.test.labels))


def main(
    data: Annotated[str, typer.Option()] = "digits",
    labels_per_class: Annotated[int, typer.Option()] = 5,
    seed: Annotated[int, typer.Option()] = 0,
    supervised_steps: Annotated[int | None, typer.Option()] = None,
    pseudo_steps: Annotated[int | None, typer.Option()] = None,
    refine_steps: Annotated[int | None, typer.Option()] = None,
    pretrain_steps: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    spreading_rounds: Annotated[int | None, typer.Option()] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    unlabeled_limit: Annotated[int | None, typer.Option()] = None,
    threads: Annotated[int, typer.Option()] = 0,
    sklearn_neighbours: Annotated[int, typer.Option()] = 7,
) -> None:
    """Print the pipeline's test accuracy next to its baselines."""
    import torch  # after trainer, which sets OpenMP's wait policy before torch loads


    budgets = {"supervised": supervised_steps, "pseudo": pseudo_steps, "refine": refine_steps,
               "pretrain": pretrain_steps}
    overrides: dict[str, object] = {
        section: {"steps": steps} for section, steps in budgets.items() if steps is not None}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if spreading_rounds is not None:
        overrides["spreading"] = {"rounds": spreading_rounds}
    config = TrainConfig(seed=seed, threads=threads, progress=False, **overrides)
    dataset = load_dataset(data, labels_per_class=labels_per_class, seed=seed,
                           image_size=image_size, progress=False)
    if unlabeled_limit is not None and unlabeled_limit < len(dataset.unlabeled):
        keep = np.random.default_rng(seed).choice(len(dataset.unlabeled), unlabeled_limit,
                                                  replace=False)
        truth = dataset.unlabeled_truth
        dataset = replace(dataset, unlabeled=dataset.unlabeled[keep],
                          unlabeled_truth=None if truth is None else truth[keep])
    console.print(f"{data} at {dataset.spec.height}x{dataset.spec.width}: "
                  f"{len(dataset.labeled)} labels, {len(dataset.unlabeled)} unlabeled, "
                  f"{len(dataset.test) if dataset.test else 0} test; {config!r}")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
                  f"{threads or 'all'} torch threads, torch {torch.__version__}, "
                  f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")

    rows = []
    started = time.perf_counter()
    accuracy, ece = halflabel(dataset, config)
    rows.append(("halflabel (ONNX)", accuracy, ece, time.perf_counter() - started))
    started = time.perf_counter()
    rows.append(("supervised, same labels", supervised(dataset, config), None,
                 time.perf_counter() - started))
    started = time.perf_counter()
    rows.append((f"sklearn LabelSpreading (knn, k={sklearn_neighbours}) on pixels",
                 sklearn_label_spreading(dataset, sklearn_neighbours), None,
                 time.perf_counter() - started))

    table = Table(title=f"{data}, {labels_per_class} labels per class, seed {seed}")
    for column in ("method", "test accuracy", "test ECE", "seconds"):
        table.add_column(column)
    for name, value, calibration, seconds in rows:
        table.add_row(name, f"{value:.2%}", "" if calibration is None else f"{calibration:.3f}",
                      f"{seconds:.0f}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
