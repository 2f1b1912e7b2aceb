"""Temperature scaling, ECE, the entropy threshold and its held-out check on synthetic data with
known answers."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from trainer.calibration import (
    check_threshold,
    expected_calibration_error,
    fit_temperature,
    normalized_entropy,
    queue_threshold,
    softmax,
)
from trainer.config import TrainConfig


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


def pool_probabilities(n: int, seed: int) -> np.ndarray:
    """Softmax over 10 classes of logits of varied sharpness: sure inputs and unsure ones."""
    rng = np.random.default_rng(seed)
    return softmax(rng.normal(0, 1, (n, 10)) * rng.uniform(0.5, 8, (n, 1)))


@pytest.mark.parametrize("share", [0.05, 0.1, 0.3])
def test_threshold_queues_the_target_share_of_the_pool_and_of_inputs_like_it(
    share: float,
) -> None:
    pool = pool_probabilities(5000, seed=0)
    threshold = queue_threshold(pool, share)
    assert abs(np.mean(normalized_entropy(pool) > threshold) - share) <= 1 / len(pool)
    traffic = normalized_entropy(pool_probabilities(5000, seed=1))
    assert abs(np.mean(traffic > threshold) - share) < 0.025


def held_out_guessed(right: int, wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """Sure held-out inputs, all guessed class 0: `right` of them labelled 0, `wrong` 1."""
    probabilities = np.tile([0.99] + [0.01 / 9] * 9, (right + wrong, 1))
    return probabilities, np.array([0] * right + [1] * wrong)


def test_the_check_scores_the_unqueued_held_out_inputs_against_the_pools_confidence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = pool_probabilities(2000, seed=0)
    threshold = queue_threshold(pool, 0.1)
    sure, labels = held_out_guessed(right=9, wrong=0)
    unsure = np.full((1, 10), 0.1)  # uniform: above any threshold, so queued
    check = check_threshold(np.vstack([sure, unsure]), np.append(labels, 3), threshold, pool)
    unqueued_pool = pool[normalized_entropy(pool) <= threshold]
    assert check.expected_accuracy == pytest.approx(unqueued_pool.max(axis=1).mean())
    assert (check.held_out, check.unqueued, check.unqueued_accuracy) == (10, 9, 1.0)
    assert check.queued_share == pytest.approx(0.1)
    assert check.warning is None and not caplog.records


def test_the_check_warns_when_the_unqueued_held_out_inputs_are_far_worse_than_expected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = np.tile([0.99] + [0.01 / 9] * 9, (100, 1))  # the model expects 99% right
    one_wrong = check_threshold(*held_out_guessed(right=9, wrong=1), 0.5, pool)
    assert one_wrong.unqueued_accuracy == 0.9 and one_wrong.warning is None
    three_wrong = check_threshold(*held_out_guessed(right=7, wrong=3), 0.5, pool)
    assert three_wrong.unqueued_accuracy == pytest.approx(0.7)
    assert three_wrong.warning is not None and "7 of the 10" in three_wrong.warning
    assert [r.getMessage() for r in caplog.records] == [three_wrong.warning]


def test_the_queue_share_is_a_share_strictly_between_0_and_1() -> None:
    assert TrainConfig(calibration={"queue_share": 0.25}).calibration.queue_share == 0.25
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValidationError, match="queue_share"):
            TrainConfig(calibration={"queue_share": bad})
