"""Pseudo-label refinement: FixMatch consistency training with FlexMatch class thresholds.

Each step, the model labels weakly augmented unlabeled images; where it is confident enough for
that class, it must give the same label to a strongly augmented copy (Sohn et al., 2020).
FlexMatch (Zhang et al., 2021) lowers the bar for classes the model has learnt less of: the
threshold of class c is tau * M(beta_c), beta_c = how many images are confidently c, relative
to the best-learnt class, M(x) = x / (2 - x). The per-image records start from the spread labels,
so the thresholds reflect label spreading's class balance from the first step instead of
starting at zero (FlexMatch's warm-up, which accepts every guess at first).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.augment import strong, weak
from trainer.config import TrainConfig
from trainer.optimise import optimise, sample_batch
from trainer.runtime import Runtime
from trainer.stage import TrainingState

UNUSED = -1


class FixMatchRefinement:
    """Consistency training on the pool, thresholds seeded by the latest pseudo-labels."""

    name = "fixmatch"

    def steps(self, config: TrainConfig) -> int:
        return config.refine.steps

    def run(self, state: TrainingState, steps: int) -> dict[str, float]:
        state.require_pool("FixMatch refinement (--refine-steps 0 to skip)")
        classes = len(state.dataset.classes)
        seeds = np.full(len(state.pool), UNUSED) if state.pseudo is None else state.pseudo.labels
        thresholds = FlexMatchThresholds(seeds, classes, state.config.refine.confidence_threshold)
        return refine(state.classifier, state.images, state.labels, state.pool, thresholds,
                      steps, state.config, state.runtime)


class FlexMatchThresholds:
    """Per-class confidence thresholds from the per-image record of confident predictions."""

    def __init__(self, seed_labels: np.ndarray, num_classes: int, tau: float) -> None:
        self.records = torch.as_tensor(seed_labels, dtype=torch.int64).clone()
        self.num_classes = num_classes
        self.tau = tau

    def thresholds(self) -> torch.Tensor:
        """tau * M(beta_c) for every class c."""
        used = self.records[self.records != UNUSED]
        learnt = torch.bincount(used, minlength=self.num_classes).float()
        unused = float(len(self.records) - len(used))
        beta = learnt / max(float(learnt.max()), unused, 1.0)
        return self.tau * beta / (2 - beta)

    def update(self, indices: torch.Tensor, confidence: torch.Tensor,
               predicted: torch.Tensor) -> None:
        """Record the predictions made with more than tau confidence."""
        confident = confidence > self.tau
        self.records[indices[confident].cpu()] = predicted[confident].cpu()


def refine(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor,
    thresholds: FlexMatchThresholds, steps: int, config: TrainConfig, runtime: Runtime,
) -> dict[str, float]:
    """`steps` FixMatch steps; returns the share of pool images last used."""
    generator = runtime.generator("refine")
    flip = config.horizontal_flip
    pool_batch = config.batch_size * config.unlabeled_ratio
    used = []

    def step_loss(module: nn.Module, step: int) -> torch.Tensor:
        known = sample_batch(config.batch_size, len(labels), generator).to(images.device)
        unknown = sample_batch(pool_batch, len(pool), generator)
        unlabeled = pool[unknown.to(pool.device)]
        inputs = torch.cat([weak(images[known], flip, generator), weak(unlabeled, flip, generator),
                            strong(unlabeled, flip, generator)])
        logits = module(inputs)
        labeled_logits, weak_logits, strong_logits = logits.split(
            [len(known), pool_batch, pool_batch])
        with torch.no_grad():
            confidence, guessed = torch.softmax(weak_logits.float(), dim=1).max(dim=1)
            mask = (confidence > thresholds.thresholds().to(confidence.device)[guessed]).float()
            thresholds.update(unknown, confidence, guessed)
        used.append(float(mask.mean()))
        consistency = F.cross_entropy(strong_logits, guessed, reduction="none") * mask
        return F.cross_entropy(labeled_logits, labels[known]) + consistency.mean()

    optimise(classifier, step_loss, steps, config.learning_rate, runtime, "refine (FixMatch)")
    return {"mask_rate_last_100": float(np.mean(used[-100:])) if used else 0.0}
