"""The classifier: a ResNet backbone, a linear head, and a calibration temperature.

The backbones are torchvision's ResNet-18/34/50, for ImageNet weights and GPUs, and He et
al.'s (2016) CIFAR ResNet-20 built from torchvision's BasicBlock: 16/32/64 channels against
ResNet-18's 64..512, so a training step on 8x8 digits takes a fifteenth of the time on a CPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torchvision
from pydantic import BaseModel, ConfigDict
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from trainer.config import Backbone, BackboneChoice
from trainer.errors import WeightsError

# Below this side, ResNet's 7x7/2 stem and max-pool would shrink the image to almost nothing.
CIFAR_STEM_BELOW = 64
IMAGENET_WEIGHTS = "IMAGENET1K_V1"  # the weights `--weights imagenet` loads, for every backbone
IMAGENET_SIZE = 224  # the side ImageNet weights were trained at
NARROW: Backbone = "resnet20"
NARROW_WIDTHS = (16, 32, 64)  # one stage each, the later two halving the resolution
NARROW_BLOCKS = 3  # BasicBlocks per stage: 2 convolutions each, 3 * 3 * 2 + stem + head = 20


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


def choose_backbone(choice: BackboneChoice, weights: str, image_size: int,
                    device: torch.device) -> Backbone:
    """The backbone `choice` names, or for `auto`: a checkpoint's own (its weights fit no
    other), resnet20 for small images trained from scratch on a CPU, else resnet18."""
    if choice != "auto":
        return choice
    if weights not in ("none", "imagenet"):
        trained = checkpoint_architecture(Path(weights))
        if trained is not None:
            return trained.backbone
    if weights == "none" and device.type == "cpu" and image_size < CIFAR_STEM_BELOW:
        return NARROW
    return "resnet18"


def build_backbone(architecture: Architecture) -> tuple[nn.Module, int]:
    """The named ResNet, its stem fitted to the input, without its classifier; returns it and
    the size of its features."""
    if architecture.backbone == NARROW:
        return _narrow_resnet(architecture.in_channels), NARROW_WIDTHS[-1]
    resnet = torchvision.models.get_model(architecture.backbone, weights=None)
    if architecture.cifar_stem:
        resnet.conv1 = nn.Conv2d(architecture.in_channels, 64, 3, 1, 1, bias=False)
        resnet.maxpool = nn.Identity()
    elif architecture.in_channels != 3:
        resnet.conv1 = nn.Conv2d(architecture.in_channels, 64, 7, 2, 3, bias=False)
    feature_dim = resnet.fc.in_features
    resnet.fc = nn.Identity()
    return resnet, feature_dim


def _narrow_resnet(in_channels: int) -> nn.Sequential:
    """CIFAR ResNet-20 with 1x1 projection shortcuts, its modules named as in torchvision's
    ResNet so checkpoints and the grey-stem rule find the same tensors."""
    width = NARROW_WIDTHS[0]
    modules: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
        bn1=nn.BatchNorm2d(width), relu=nn.ReLU(inplace=True))
    for stage, planes in enumerate(NARROW_WIDTHS, start=1):
        blocks = []
        for index in range(NARROW_BLOCKS):
            stride = 2 if stage > 1 and index == 0 else 1
            shortcut = None
            if stride != 1 or width != planes:
                shortcut = nn.Sequential(conv1x1(width, planes, stride), nn.BatchNorm2d(planes))
            blocks.append(BasicBlock(width, planes, stride, shortcut))
            width = planes
        modules[f"layer{stage}"] = nn.Sequential(*blocks)
    modules["avgpool"] = nn.AdaptiveAvgPool2d(1)
    modules["flatten"] = nn.Flatten()
    network = nn.Sequential(modules)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):  # torchvision's ResNet initialisation
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return network


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


def checkpoint_architecture(path: Path) -> Architecture | None:
    """The architecture a weights.pt was saved with; None for a bare state dict."""
    architecture = load_checkpoint(path)["architecture"]
    return None if architecture is None else Architecture(**architecture)


def trained_image_size(weights: str) -> int | None:
    """The input side `weights` were trained at: ImageNet's, a checkpoint's own, or None
    (no weights, or a bare state dict that does not say)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return IMAGENET_SIZE
    architecture = checkpoint_architecture(Path(weights))
    return None if architecture is None else architecture.image_size


def classifier_from_checkpoint(path: Path) -> Classifier:
    """Rebuild a published model's classifier from its weights.pt, temperature included."""
    checkpoint = load_checkpoint(path)
    if checkpoint["architecture"] is None:
        raise WeightsError(f"{path} has no architecture; use a weights.pt from a published model")
    classifier = Classifier(Architecture(**checkpoint["architecture"]))
    classifier.load_state_dict(checkpoint["state_dict"])
    return classifier


def _imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    if backbone == NARROW:
        raise WeightsError(f"there are no ImageNet weights for {NARROW}; use --backbone "
                           "resnet18, resnet34 or resnet50 with --weights imagenet")
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
