"""The report published next to a model: report.json and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.calibration import reliability_bins  # noqa: E402

PLOT_DPI = 110


def write_report(path: Path, content: dict[str, Any]) -> Path:
    """report.json, readable by people and by tools."""
    path.write_text(json.dumps(content, indent=2, default=_plain))
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to report.json")


def plot_confusion_matrix(
    path: Path, labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> Path:
    """Rows: true class, columns: predicted class; counts in each cell."""
    size = len(classes)
    matrix = np.zeros((size, size), dtype=int)
    np.add.at(matrix, (labels, predicted), 1)
    figure, axes = plt.subplots(figsize=(1.5 + 0.5 * size, 1 + 0.5 * size))
    axes.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        axes.text(column, row, str(count), ha="center", va="center", fontsize=7, color=color)
    axes.set(xticks=range(size), yticks=range(size), xlabel="predicted", ylabel="true",
             title="Confusion matrix (test)")
    axes.set_xticklabels(classes, rotation=45, ha="right")
    axes.set_yticklabels(classes)
    return _save(figure, path)


def plot_reliability(
    path: Path, labels: np.ndarray, before: np.ndarray, after: np.ndarray
) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, probabilities in (("before scaling", before), ("after scaling", after)):
        confidence, accuracy, counts = reliability_bins(probabilities, labels)
        shown = counts > 0
        axes.plot(confidence[shown], accuracy[shown], marker="o", label=name)
    axes.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
             title="Reliability diagram (test)")
    axes.legend(loc="upper left")
    return _save(figure, path)


def plot_stage_accuracy(path: Path, stages: list[tuple[str, float]]) -> Path:
    """Test accuracy after each stage of the pipeline."""
    figure, axes = plt.subplots(figsize=(1.5 + 1.2 * len(stages), 3.5))
    names = [name for name, _ in stages]
    accuracy = [value for _, value in stages]
    bars = axes.bar(names, accuracy, color="tab:blue")
    axes.bar_label(bars, labels=[f"{value:.1%}" for value in accuracy])
    axes.set(ylim=(0, 1.08), ylabel="test accuracy", title="Accuracy by stage")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    return path
