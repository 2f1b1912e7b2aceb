"""The pinned torch and torchvision builds import together and build the trainer's backbone."""

import torch
import torchvision


def test_torchvision_builds_a_resnet_with_the_pinned_torch() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")
