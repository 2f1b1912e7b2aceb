"""Temperature scaling, ECE and the entropy-threshold rule on synthetic data with known answers."""

from __future__ import annotations

import numpy as np

from trainer.calibration import (
    choose_entropy_threshold,
    expected_calibration_error,
    fit_temperature,
    normalized_entropy,
    softmax,
)


def overconfident_logits(
    n: int, temperature: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the logits handed out are z * temperature."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2, size=(n, 5))
    probabilities = softmax(true_logits)
    labels = np.array([rng.choice(5, p=p) for p in probabilities])
    return true_logits * temperature, labels


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece() -> None:
    logits, labels = overconfident_logits(4000, temperature=3.0)
    temperature = fit_temperature(logits, labels)
    assert abs(temperature - 3.0) < 0.3
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, temperature), labels)
    assert after < before / 3 and after < 0.03


def test_a_few_perfect_held_out_images_do_not_send_the_temperature_to_zero() -> None:
    logits = np.eye(3)[[0, 1, 2, 0, 1]] * 4.0
    temperature = fit_temperature(logits, np.array([0, 1, 2, 0, 1]))
    assert 0.3 < temperature < 1.0


def test_ece_of_perfectly_calibrated_predictions_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, 20000)
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    labels = (rng.uniform(size=20000) > confidence).astype(int)
    assert expected_calibration_error(probabilities, labels) < 0.02
    always_wrong = expected_calibration_error(probabilities, 1 - probabilities.argmax(axis=1))
    assert abs(always_wrong - confidence.mean()) < 1e-9


def test_threshold_keeps_the_unqueued_inputs_at_the_target_accuracy() -> None:
    # Ten inputs, all guessed class 0 with rising entropy; the last three are wrong.
    confident = np.linspace(0.99, 0.55, 10)
    probabilities = np.stack([confident, 1 - confident], axis=1)
    labels = np.array([0] * 7 + [1] * 3)
    threshold = choose_entropy_threshold(probabilities, labels, target_accuracy=1.0,
                                         min_queue_fraction=0.0)
    entropy = normalized_entropy(probabilities)
    assert threshold == entropy[6]
    kept = entropy <= threshold
    assert np.all(probabilities[kept].argmax(axis=1) == labels[kept])


def test_threshold_queues_at_least_the_minimum_fraction() -> None:
    confident = np.linspace(0.99, 0.6, 20)
    probabilities = np.stack([confident, 1 - confident], axis=1)
    labels = np.zeros(20, dtype=int)
    threshold = choose_entropy_threshold(probabilities, labels, target_accuracy=0.9,
                                         min_queue_fraction=0.25)
    assert np.mean(normalized_entropy(probabilities) > threshold) >= 0.25


def test_threshold_is_zero_when_even_the_surest_input_is_wrong() -> None:
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4]])
    assert choose_entropy_threshold(probabilities, np.array([1, 1]), 0.95, 0.1) == 0.0
