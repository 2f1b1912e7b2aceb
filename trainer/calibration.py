"""Temperature scaling, expected calibration error, and the entropy threshold for queueing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15
# Prior on log T: N(0, 0.5^2). With a handful of held-out images, all classified correctly,
# maximum likelihood drives T to 0 (infinite confidence); the prior keeps it sensible.
LOG_TEMPERATURE_PRIOR_STD = 0.5


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


def choose_entropy_threshold(
    probabilities: np.ndarray, labels: np.ndarray, target_accuracy: float,
    min_queue_fraction: float,
) -> float:
    """The normalized entropy above which the service queues an input for labelling.

    Rule, on held-out labeled data: the largest threshold t such that the inputs at or below t
    (the ones not queued) are at least `target_accuracy` correct, capped so that at least
    `min_queue_fraction` of held-out inputs would be queued. 0 (queue everything) when even
    the most certain inputs miss the target.
    """
    entropy = normalized_entropy(probabilities)
    correct = probabilities.argmax(axis=1) == labels
    order = np.argsort(entropy, kind="stable")
    kept_accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    meets = np.flatnonzero(kept_accuracy >= target_accuracy)
    threshold = float(entropy[order][meets[-1]]) if len(meets) else 0.0
    cap = float(np.quantile(entropy, 1 - min_queue_fraction)) if min_queue_fraction > 0 else 1.0
    return float(np.clip(min(threshold, cap), 0.0, 1.0))
