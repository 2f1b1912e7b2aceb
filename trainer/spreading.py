"""Pseudo-labels by label spreading on the backbone's embeddings (Iscen et al., CVPR 2019).

Each unlabeled image gets the class label spreading assigns it and a loss weight: its
entropy-based confidence times a class weight that evens out how many images each class got.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PseudoLabels:
    """One class per unlabeled image, its confidence (0..1) and its loss weight."""

    labels: np.ndarray
    confidence: np.ndarray
    weights: np.ndarray


def spread_labels(
    labeled_embeddings: np.ndarray,
    labels: np.ndarray,
    unlabeled_embeddings: np.ndarray,
    num_classes: int,
    n_neighbors: int,
    alpha: float,
) -> PseudoLabels:
    """Spread `labels` over a kNN graph of all embeddings; returns the unlabeled pool's labels."""
    from trainer.label_spreading import LabelSpreading

    features = np.concatenate([labeled_embeddings, unlabeled_embeddings]).astype(np.float32)
    targets = np.concatenate([labels, np.full(len(unlabeled_embeddings), -1)])
    neighbours = min(n_neighbors, len(features) - 1)
    model = LabelSpreading(n_neighbors=neighbours, alpha=alpha, classes=np.arange(num_classes))
    model.fit(features, targets)
    pool = slice(len(labels), None)
    assigned = np.asarray(model.transduction_[pool], dtype=np.int64)
    confidence = np.asarray(model.confidence_[pool], dtype=np.float32)
    counts = np.bincount(assigned, minlength=num_classes).astype(np.float32)
    balance = len(assigned) / (num_classes * np.maximum(counts, 1))
    return PseudoLabels(assigned, confidence, confidence * balance[assigned])
