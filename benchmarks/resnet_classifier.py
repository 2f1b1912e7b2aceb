"""The benchmark's model: torchvision ResNet-18 (random weights) returning probabilities and
entropy, the outputs every halflabel artifact has."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class ProbabilitiesAndEntropy(nn.Module):
    """Wraps a logits network into (softmax probabilities, entropy in nats)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probabilities = torch.log_softmax(self.network(images), dim=1)
        probabilities = log_probabilities.exp()
        return probabilities, -(probabilities * log_probabilities).sum(dim=1)


def resnet18_classifier(num_classes: int) -> ProbabilitiesAndEntropy:
    """ResNet-18 with `num_classes` outputs; weights are random (nothing is downloaded)."""
    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return ProbabilitiesAndEntropy(network)
