"""The pseudo-labels the trainer learns from: soft targets that keep spreading's doubt."""

from __future__ import annotations

import numpy as np

from trainer.spreading import spread_labels


def test_images_of_an_unlabelled_class_get_flat_targets() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    pool_classes = np.repeat(np.arange(3), 40)
    # Nobody labelled class 2, and a thin chain of images leads to it from class 1 only: the
    # little class-1 mass that trickles along makes its normalised rows all class 1.
    chain = centres[1] + np.linspace(0.2, 0.8, 6)[:, None] * (centres[2] - centres[1])
    pool = np.concatenate([centres[pool_classes] + rng.normal(size=(120, 16)),
                           chain + rng.normal(size=(6, 16)) * 0.3])
    pool_classes = np.concatenate([pool_classes, np.full(6, -1)])
    labeled = centres[[0, 0, 1, 1]] + rng.normal(size=(4, 16))

    pseudo = spread_labels(labeled, np.array([0, 0, 1, 1]), pool, 3, n_neighbors=5, alpha=0.9,
                           unreached_prior=0.01)
    without_prior = spread_labels(labeled, np.array([0, 0, 1, 1]), pool, 3, n_neighbors=5,
                                  alpha=0.9)

    np.testing.assert_allclose(pseudo.targets.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(pseudo.targets.argmax(axis=1), pseudo.labels)
    known, unlabelled_class = np.isin(pool_classes, [0, 1]), pool_classes == 2
    assert np.mean(pseudo.labels[known] == pool_classes[known]) > 0.95
    # The targets' peak is the confidence: high near the labels, low on the unlabelled class,
    # so a network trained on them is unsure there and the service queues those images first.
    peak = pseudo.targets.max(axis=1)
    assert np.median(peak[unlabelled_class]) < np.median(peak[known]) - 0.2
    # Normalised rows alone call the trickle from class 1 certain.
    assert np.median(without_prior.confidence[unlabelled_class]) > 0.9
    np.testing.assert_allclose(peak, pseudo.confidence + (1 - pseudo.confidence) / 3, rtol=1e-5)
