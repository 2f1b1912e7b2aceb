"""Supervised stages: fine-tuning on the labeled images, then on labeled + pseudo-labeled ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.augment import weak
from trainer.config import TrainConfig
from trainer.optimise import optimise, sample_batch
from trainer.runtime import Runtime
from trainer.stage import TrainingState


class SupervisedFineTuning:
    """Cross-entropy on the labeled images alone."""

    name = "supervised"

    def steps(self, config: TrainConfig) -> int:
        return config.supervised.steps

    def run(self, state: TrainingState, steps: int) -> dict[str, float]:
        losses = train_on_labels(state.classifier, state.images, state.labels, steps,
                                 state.config, state.runtime)
        return {"final_loss": losses[-1]}


def train_on_labels(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
    config: TrainConfig, runtime: Runtime, description: str = "fine-tune",
) -> list[float]:
    """Cross-entropy on weakly augmented batches of the labeled images."""
    generator = runtime.generator(description)

    def step_loss(module: nn.Module, step: int) -> torch.Tensor:
        batch = sample_batch(config.batch_size, len(labels), generator).to(images.device)
        inputs = weak(images[batch], config.horizontal_flip, generator)
        return F.cross_entropy(module(inputs), labels[batch])

    return optimise(classifier, step_loss, steps, config.learning_rate, runtime, description)


def train_on_pseudo_labels(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    pool: torch.Tensor, pseudo_targets: torch.Tensor, pseudo_weights: torch.Tensor,
    steps: int, config: TrainConfig, runtime: Runtime, description: str = "pseudo-labels",
) -> list[float]:
    """Each batch: labeled images plus pool images with soft targets (rows of class
    probabilities), the latter weighted per image."""
    generator = runtime.generator(description)
    pool_batch = config.batch_size * config.unlabeled_ratio

    def step_loss(module: nn.Module, step: int) -> torch.Tensor:
        known = sample_batch(config.batch_size, len(labels), generator).to(images.device)
        guessed = sample_batch(pool_batch, len(pool), generator).to(images.device)
        inputs = weak(torch.cat([images[known], pool[guessed]]), config.horizontal_flip,
                      generator)
        logits = module(inputs)
        supervised = F.cross_entropy(logits[: len(known)], labels[known])
        pseudo = F.cross_entropy(logits[len(known):], pseudo_targets[guessed], reduction="none")
        return supervised + (pseudo * pseudo_weights[guessed]).mean()

    return optimise(classifier, step_loss, steps, config.learning_rate, runtime, description)
