"""Where training runs: the device, mixed precision, and the torchrun (DDP) process group."""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import Device
from trainer.errors import SettingsError

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """One training process: its device and, under torchrun, its rank among `world_size`."""

    device: torch.device
    seed: int
    rank: int = 0
    world_size: int = 1
    progress: bool = True

    @property
    def is_main(self) -> bool:
        """Only the main process evaluates, exports, publishes and draws progress bars."""
        return self.rank == 0

    @property
    def show_progress(self) -> bool:
        return self.progress and self.is_main

    def autocast(self) -> AbstractContextManager[object]:
        """bfloat16 mixed precision on CUDA (no loss scaling needed); full precision on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def agree(self, value: T) -> T:
        """Rank 0's `value` on every rank: DDP processes must take the same decisions."""
        if self.world_size == 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def generator(self, stage: str) -> torch.Generator:
        """A CPU generator for one stage: the same draws for the same seed, rank and stage."""
        # Not hash(stage): Python salts string hashes per process, and every rank and rerun
        # must derive the same key.
        stage_key = sum(ord(c) * 31**i for i, c in enumerate(stage)) % 1_000_003
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stage_key + 7919 * self.rank)


def start_runtime(device: Device, seed: int, threads: int = 0, progress: bool = True) -> Runtime:
    """Pick the device, seed everything, and join the torchrun process group when there is one."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // world_size))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(not use_cuda, warn_only=True)
    return Runtime(torch_device, seed, rank, world_size, progress)


def stop_runtime() -> None:
    """Leave the torchrun process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
