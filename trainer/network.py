"""The classifier: a torchvision ResNet backbone, a linear head, and a calibration temperature."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torchvision
from pydantic import BaseModel, ConfigDict
from torch import nn

from trainer.config import Backbone
from trainer.errors import WeightsError

# Below this side, ResNet's 7x7/2 stem and max-pool would shrink the image to almost nothing.
CIFAR_STEM_BELOW = 64
IMAGENET_WEIGHTS = "IMAGENET1K_V1"  # the weights `--weights imagenet` loads, for every backbone


class Architecture(BaseModel):
    """All it takes to rebuild the network; saved in weights.pt beside the state dict."""

    model_config = ConfigDict(frozen=True)

    backbone: Backbone
    num_classes: int
    in_channels: int
    image_size: int

    @property
    def cifar_stem(self) -> bool:
        return self.image_size < CIFAR_STEM_BELOW


class Classifier(nn.Module):
    """ResNet features → linear logits; `temperature` divides the logits once calibrated."""

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        self.architecture = architecture
        self.backbone, self.feature_dim = build_backbone(architecture)
        self.head = nn.Linear(self.feature_dim, architecture.num_classes)
        self.register_buffer("temperature", torch.ones(()))

    def set_temperature(self, temperature: float) -> None:
        self.temperature.fill_(temperature)  # type: ignore[operator]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def build_backbone(architecture: Architecture) -> tuple[nn.Module, int]:
    """The named torchvision ResNet, its stem fitted to the input, without its classifier;
    returns it and the size of its features."""
    resnet = torchvision.models.get_model(architecture.backbone, weights=None)
    if architecture.cifar_stem:
        resnet.conv1 = nn.Conv2d(architecture.in_channels, 64, 3, 1, 1, bias=False)
        resnet.maxpool = nn.Identity()
    elif architecture.in_channels != 3:
        resnet.conv1 = nn.Conv2d(architecture.in_channels, 64, 7, 2, 3, bias=False)
    feature_dim = resnet.fc.in_features
    resnet.fc = nn.Identity()
    return resnet, feature_dim


class ProbabilitiesAndEntropy(nn.Module):
    """The exported graph: calibrated softmax probabilities and their entropy in nats."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(images) / self.classifier.temperature
        log_probabilities = torch.log_softmax(logits, dim=1)
        probabilities = log_probabilities.exp()
        entropy = -(probabilities * log_probabilities).sum(dim=1)
        return probabilities, entropy


def build_classifier(architecture: Architecture, weights: str = "none") -> Classifier:
    """A new classifier initialised from `imagenet`, a checkpoint path, or `none`.

    A checkpoint of the same architecture (a published weights.pt) gives the head too, so
    training continues from that model; otherwise only the backbone tensors that fit are used.
    The temperature always starts at 1: it is fitted again after training.
    """
    classifier = Classifier(architecture)
    if weights == "imagenet":
        _load_backbone(classifier, _imagenet_state(architecture.backbone))
    elif weights != "none":
        checkpoint = load_checkpoint(Path(weights))
        if checkpoint["architecture"] == architecture.model_dump():
            state = {k: v for k, v in checkpoint["state_dict"].items() if k != "temperature"}
            classifier.load_state_dict(state, strict=False)
        else:
            _load_backbone(classifier, checkpoint["state_dict"])
    return classifier


def save_checkpoint(classifier: Classifier, path: Path) -> None:
    """weights.pt: the state dict and the architecture that rebuilds it."""
    torch.save(
        {"architecture": classifier.architecture.model_dump(),
         "state_dict": classifier.state_dict()},
        path,
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read weights.pt (or a bare state dict) into {'state_dict', 'architecture' or None}."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; give an existing checkpoint or 'none'")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise WeightsError(f"cannot read weights {path}: {exc}".splitlines()[0]) from None
    if isinstance(content, dict) and "state_dict" in content:
        return {"state_dict": content["state_dict"], "architecture": content.get("architecture")}
    return {"state_dict": content, "architecture": None}


def classifier_from_checkpoint(path: Path) -> Classifier:
    """Rebuild a published model's classifier from its weights.pt, temperature included."""
    checkpoint = load_checkpoint(path)
    if checkpoint["architecture"] is None:
        raise WeightsError(f"{path} has no architecture; use a weights.pt from a published model")
    classifier = Classifier(Architecture(**checkpoint["architecture"]))
    classifier.load_state_dict(checkpoint["state_dict"])
    return classifier


def _imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    url = torchvision.models.get_model_weights(backbone)[IMAGENET_WEIGHTS].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {backbone} are not in the local cache: download {url} "
            f"on a machine with network and put it at {path}, or use --weights none"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_backbone(classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
    """Copy every tensor whose name and shape fit; a grey stem gets the colour stem's sum."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    own = classifier.backbone.state_dict()
    stem = state.get("conv1.weight")
    if stem is not None and stem.shape[1] == 3 and own["conv1.weight"].shape[1] == 1:
        state["conv1.weight"] = stem.sum(dim=1, keepdim=True)
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < len(own) / 2:
        raise WeightsError(
            f"the weights fit only {len(fitting)} of {len(own)} backbone tensors; "
            f"they are for another backbone than {classifier.architecture.backbone}"
        )
    classifier.backbone.load_state_dict(fitting, strict=False)


def entropy_normaliser(num_classes: int) -> float:
    """ln(C): the entropy of a uniform guess, which maps entropy to 0..1."""
    return math.log(num_classes)
