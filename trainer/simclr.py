"""Self-supervised pretraining of the backbone on unlabeled images (SimCLR, Chen et al., 2020).

Two strong augmentations of the same image must embed close together and far from every other
image in the batch (the NT-Xent loss), which teaches the backbone features before any label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.augment import strong
from trainer.config import TrainConfig
from trainer.optimise import optimise, sample_batch
from trainer.runtime import Runtime
from trainer.stage import TrainingState

PROJECTION_DIM = 128
TEMPERATURE = 0.5


class _Contrastive(nn.Module):
    """The backbone plus the projection head SimCLR trains through (and then discards)."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
            nn.Linear(feature_dim, PROJECTION_DIM),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.backbone(images)), dim=1)


def nt_xent(embeddings: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent on 2N unit embeddings where rows i and i+N are two views of one image."""
    n = embeddings.shape[0] // 2
    similarity = embeddings.float() @ embeddings.float().T / temperature
    similarity.fill_diagonal_(float("-inf"))  # an embedding is not its own positive
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(embeddings.device)
    return F.cross_entropy(similarity, partner)


class SimCLRPretraining:
    """Teaches an untrained backbone features from every training image, before any label."""

    name = "simclr"

    def steps(self, config: TrainConfig) -> int:
        return config.pretrain.steps if config.weights == "none" else 0

    def run(self, state: TrainingState, steps: int) -> dict[str, float]:
        state.require_pool("SimCLR pretraining")
        everything = torch.cat([state.images, state.pool])
        return pretrain(state.classifier.backbone, state.classifier.feature_dim, everything,
                        steps, state.config, state.runtime)


def pretrain(
    backbone: nn.Module, feature_dim: int, images: torch.Tensor, steps: int,
    config: TrainConfig, runtime: Runtime,
) -> dict[str, float]:
    """`steps` SimCLR steps on `images`, updating `backbone` in place."""
    model = _Contrastive(backbone, feature_dim).to(images.device)
    generator = runtime.generator("simclr")
    flip = config.horizontal_flip

    def step_loss(module: nn.Module, step: int) -> torch.Tensor:
        batch = images[sample_batch(config.batch_size, len(images), generator).to(images.device)]
        return nt_xent(module(torch.cat([strong(batch, flip, generator),
                                         strong(batch, flip, generator)])))

    losses = optimise(model, step_loss, steps, config.learning_rate, runtime, "pretrain (SimCLR)")
    return {"final_loss": losses[-1]}
