"""Training under torchrun (DDP) with two CPU processes on the gloo backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from models.repository import ModelRepository

TINY = ["--supervised-steps", "3", "--pseudo-steps", "3", "--refine-steps", "2",
        "--batch-size", "8", "--threads", "1", "--no-progress", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_with_two_processes_publishes_one_version(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", "fit", "--data", "digits", "--name", "ddp", "--labels-per-class", "3",
         *TINY],
        env={**os.environ, "HALFLABEL_MODEL_DIR": str(store)},
        capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("published ddp:") == 1
    artifact = ModelRepository(store).resolve("ddp")
    assert ModelRepository(store).versions("ddp") == [1]
    report = json.loads((artifact.path / "report.json").read_text())
    assert report["processes"] == 2


def _train_one_rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    from trainer.config import TrainConfig
    from trainer.data import load_dataset
    from trainer.pipeline import run_pipeline
    from trainer.runtime import stop_runtime

    dataset = load_dataset("digits", labels_per_class=5, progress=False)
    config = TrainConfig(threads=1, progress=False, batch_size=8, supervised={"steps": 3},
                         pseudo={"steps": 3}, refine={"steps": 2}, device="cpu")
    trained = run_pipeline(dataset, config)
    torch.save(trained.classifier.state_dict(), out / f"rank{rank}.pt")
    stop_runtime()


@pytest.mark.slow
def test_ranks_draw_different_batches_but_end_with_identical_weights(tmp_path: Path) -> None:
    mp.spawn(_train_one_rank, args=(free_port(), tmp_path), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name, tensor in states[0].items():
        np.testing.assert_array_equal(tensor.numpy(), states[1][name].numpy(), err_msg=name)
    assert float(states[0]["temperature"]) != 1.0  # calibrated after training, on both ranks
