"""The one training loop every stage shares: SGD with Nesterov momentum and a cosine schedule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from trainer.runtime import Runtime

WEIGHT_DECAY = 5e-4
PREDICT_BATCH = 512

# Given the module to call (DDP-wrapped under torchrun) and the step number, return the loss.
StepLoss = Callable[[nn.Module, int], torch.Tensor]


def optimise(
    module: nn.Module, step_loss: StepLoss, steps: int, learning_rate: float, runtime: Runtime,
    description: str,
) -> list[float]:
    """Run `steps` SGD steps on `module`'s parameters; returns the loss of every step."""
    if steps == 0:
        return []
    module.train()
    trained = module
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = DistributedDataParallel(module, device_ids=device_ids)
    optimiser = torch.optim.SGD(module.parameters(), lr=learning_rate, momentum=0.9,
                                nesterov=True, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    losses = []
    bar = tqdm(range(steps), desc=description, unit="step", disable=not runtime.show_progress)
    for step in bar:
        with runtime.autocast():
            loss = step_loss(trained, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    if runtime.world_size > 1:
        _broadcast_state(module)
    module.eval()
    return losses


def _broadcast_state(module: nn.Module) -> None:
    """Give every rank rank 0's buffers: BatchNorm statistics drift apart after the last step."""
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


@torch.no_grad()
def predict(
    function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, runtime: Runtime
) -> np.ndarray:
    """Apply `function` (a module in eval mode, or one of its methods) batch by batch."""
    outputs = []
    for start in range(0, len(images), PREDICT_BATCH):
        with runtime.autocast():
            outputs.append(function(images[start:start + PREDICT_BATCH]).float().cpu())
    return torch.cat(outputs).numpy()


def sample_batch(size: int, population: int, generator: torch.Generator) -> torch.Tensor:
    """`size` random indices into `population` items (with replacement: sets may be tiny)."""
    return torch.randint(population, (size,), generator=generator)
