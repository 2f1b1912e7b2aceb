"""Temperature scaling, expected calibration error, the entropy threshold for queueing and its
check on held-out labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest

log = logging.getLogger(__name__)

ECE_BINS = 15
# Prior on log T: N(0, 0.5^2). With a handful of held-out images, all classified correctly,
# maximum likelihood drives T to 0 (infinite confidence); the prior keeps it sensible.
LOG_TEMPERATURE_PRIOR_STD = 0.5
# The held-out check warns below this p-value: with nine unqueued held-out inputs expected 97%
# right, one mistake is noise (p = 0.24) and two are not (p = 0.03).
CHECK_P_VALUE = 0.05


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T maximising the posterior of softmax(logits / T) on held-out labels.

    Negative log-likelihood plus a log-normal prior on T centred on 1, whose pull fades as
    held-out images accumulate.
    """
    prior_weight = 1 / (2 * LOG_TEMPERATURE_PRIOR_STD**2 * len(labels))
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.exp(), labels_t) + prior_weight * log_t**2
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, 1).numpy()


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy, and count (empty bins give 0)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    safe = np.maximum(counts, 1)
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / safe
    accuracy = np.bincount(which, weights=correct, minlength=bins) / safe
    return mean_confidence, accuracy, counts


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over 15 bins."""
    mean_confidence, accuracy, counts = reliability_bins(probabilities, labels)
    return float(np.sum(counts * np.abs(mean_confidence - accuracy)) / max(len(labels), 1))


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy divided by ln(C), as the service computes it: 0 = certain, 1 = uniform."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1) / np.log(probabilities.shape[1])


def queue_threshold(probabilities: np.ndarray, queue_share: float) -> float:
    """The normalized entropy above which `queue_share` of these inputs lie: the service then
    queues about that share of inputs like them, whatever labels the threshold was fitted with."""
    return float(np.quantile(normalized_entropy(probabilities), 1 - queue_share))


@dataclass(frozen=True)
class ThresholdCheck:
    """The held-out labels against the threshold: how right the inputs it leaves unqueued are,
    beside what the calibrated model expects of the unqueued reference (pool) inputs."""

    held_out: int
    unqueued: int
    unqueued_accuracy: float | None  # None when every held-out input is queued
    queued_share: float
    expected_accuracy: float
    p_value: float | None  # of a one-sided binomial test: this few right, if expected held
    warning: str | None

    def describe(self) -> str:
        right = ("none left unqueued" if self.unqueued_accuracy is None else
                 f"{self.unqueued_accuracy:.1%} right of the {self.unqueued} below it "
                 f"(expected {self.expected_accuracy:.1%})")
        return (f"held-out check: {self.queued_share:.0%} of {self.held_out} held-out inputs "
                f"above the threshold; {right}")


def check_threshold(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float, reference: np.ndarray,
) -> ThresholdCheck:
    """Score the held-out inputs (`probabilities`, `labels`) the threshold leaves unqueued
    against the calibrated confidence of the `reference` inputs it leaves unqueued, and log a
    warning when they are far worse than that (p < CHECK_P_VALUE)."""
    queued = normalized_entropy(probabilities) > threshold
    correct = int(np.sum(probabilities.argmax(axis=1)[~queued] == labels[~queued]))
    unqueued = int(np.sum(~queued))
    kept = reference[normalized_entropy(reference) <= threshold]
    expected = float(kept.max(axis=1).mean()) if len(kept) else 1.0
    p_value = (float(binomtest(correct, unqueued, expected, alternative="less").pvalue)
               if unqueued else None)
    warning = None
    if p_value is not None and p_value < CHECK_P_VALUE:
        warning = (f"held-out check: only {correct} of the {unqueued} held-out inputs below the "
                   f"entropy threshold are right, far below the {expected:.1%} the calibrated "
                   f"model expects (p = {p_value:.3f}); the held-out labels may not look like "
                   "the pool, or the model is overconfident")
        log.warning(warning)
    return ThresholdCheck(
        held_out=len(labels), unqueued=unqueued,
        unqueued_accuracy=correct / unqueued if unqueued else None,
        queued_share=float(np.mean(queued)), expected_accuracy=expected, p_value=p_value,
        warning=warning,
    )
