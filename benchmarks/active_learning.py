"""Closed-loop active learning on digits through the real system, next to scikit-learn's loop.

The classic protocol (scikit-learn's "label propagation digits active learning" example with
10 initial labels): the first 330 of the shuffled digits, 10 labelled, 5 more per round, 5
rounds; the figure is accuracy on the images still unlabelled at each round. The example
shuffles with one seed (0); `--orderings K` runs the protocol on the shufflings of seeds
0..K-1 (default 5) and reports each round's mean and worst ordering for both loops, and on how
many orderings halflabel's loop is at least scikit-learn's.

- scikit-learn: LabelSpreading(gamma=0.25, max_iter=20) on raw pixels; each round labels the 5
  unlabelled images of highest predictive entropy.
- halflabel: a model trained from the 10 labels is published and served by `python -m service`.
  Each round every still-unlabelled image is sent to `/v1/predict` over HTTP (the service
  queues them in Redis by uncertainty; HALFLABEL_ENTROPY_THRESHOLD=0 so the queue's priority,
  not a threshold, picks), an oracle that knows the true labels claims the 5 most uncertain
  through `/v1/labelling/tasks` and labels them through the labelling API, and `retrain`
  snapshots the label store, fine-tunes from the served version, and publishes if the
  candidate is not worse on a held-out test split (the other 1467 digits, used only by this
  promotion gate). The service swaps versions by itself; the next round waits for that.

The training budget suits 10-30 labels: two spreading rounds, the first over pixels (also when
retraining from the parent), the second over the embeddings of the network trained on the
first round's labels, 150 steps on each round's soft pseudo-labels whose confidence counts the
label mass reaching an image (`unreached_prior` 0.01, so the classes the first labels miss are
queued), and no FixMatch: its self-training amplified the errors of its own guesses at 10
labels (test accuracy 49% -> 27% in one run).

Run: nice .venv/bin/python benchmarks/active_learning.py [--rounds 5] [--orderings 5] [--threads 2]
(needs Redis at HALFLABEL_REDIS_URL, default 127.0.0.1:6379; its keys use a private prefix
that is deleted at the end)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import redis
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table
from scipy import stats
from sklearn import datasets
from sklearn.semi_supervised import LabelSpreading

from models.labels import LabelStore
from models.manifest import InputSpec
from models.preprocessing import uint8_to_array
from models.repository import ModelRepository
from trainer.config import SpreadingSpace, TrainConfig
from trainer.data import DIGITS_STATS, Dataset, ImageSet
from trainer.pipeline import run_pipeline
from trainer.publish import export_and_publish
from trainer.retrain import retrain

ROOT = Path(__file__).resolve().parent.parent
POOL_SIZE, INITIAL_LABELS, PER_ROUND = 330, 10, 5
CLASSES = tuple(str(d) for d in range(10))
MODEL = "al-digits"
SHOWN_CONFIG = {"backbone", "supervised", "pseudo", "refine", "spreading", "calibration"}
console = Console()
app = typer.Typer(add_completion=False)


class Digits:
    """The protocol's split: the first 330 digits shuffled with seed `ordering` (the example's
    is 0), the first 10 of them labelled."""

    def __init__(self, ordering: int) -> None:
        digits = datasets.load_digits()
        order = np.random.RandomState(ordering).permutation(len(digits.data))
        self.features = digits.data[order]  # scikit-learn's loop works on these 64 values
        self.pixels = np.round(digits.images[order] * (255 / 16)).astype(np.uint8)
        self.targets = digits.target[order]
        self.pngs = [_png(image) for image in self.pixels[:POOL_SIZE]]

    @property
    def pool(self) -> slice:
        return slice(0, POOL_SIZE)


def sklearn_loop(digits: Digits, rounds: int) -> list[float]:
    """scikit-learn's active-learning loop: accuracy on the still-unlabelled images per round."""
    x, y = digits.features[digits.pool], digits.targets[digits.pool]
    unlabelled = np.arange(INITIAL_LABELS, POOL_SIZE)
    accuracies = []
    for _ in range(rounds):
        y_train = y.copy()
        y_train[unlabelled] = -1
        model = LabelSpreading(gamma=0.25, max_iter=20).fit(x, y_train)
        accuracies.append(float(np.mean(model.transduction_[unlabelled] == y[unlabelled])))
        entropy = stats.distributions.entropy(model.label_distributions_.T)
        most_uncertain = [i for i in np.argsort(entropy)[::-1] if i in set(unlabelled)]
        unlabelled = np.setdiff1d(unlabelled, most_uncertain[:PER_ROUND])
    return accuracies


def base_dataset(digits: Digits) -> Dataset:
    """The system's training data: 10 labels, 320 unlabelled, the other digits as the gate's
    test split. All ten classes are declared, though the first 10 labels cover only seven."""
    spec = InputSpec(height=8, width=8, channels=1, color_mode="L", mean=(DIGITS_STATS[0],),
                     std=(DIGITS_STATS[1],))
    inputs = np.stack([uint8_to_array(image, spec) for image in digits.pixels])
    labelled, pool, rest = slice(0, INITIAL_LABELS), slice(INITIAL_LABELS, POOL_SIZE), slice(
        POOL_SIZE, None)
    return Dataset(
        source="digits-active-learning",
        classes=CLASSES,
        spec=spec,
        labeled=ImageSet(inputs[labelled], digits.targets[labelled]),
        unlabeled=inputs[pool],
        test=ImageSet(inputs[rest], digits.targets[rest]),
        unlabeled_truth=digits.targets[pool],
    )


@contextlib.contextmanager
def running_service(env: dict[str, str], log: Path) -> Iterator[str]:
    """`python -m service` on a free loopback port; yields its URL once ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _ready(url), 120, f"service not ready; see {log}")
        yield url
    finally:
        process.terminate()
        process.wait(30)


class Loop:
    """One halflabel closed loop: predict over HTTP, label the queue's top 5, retrain."""

    def __init__(self, client: httpx.Client, digits: Digits) -> None:
        self.client = client
        self.digits = digits
        self.unlabelled = set(range(INITIAL_LABELS, POOL_SIZE))

    def predict_and_score(self, version: int) -> float:
        """Predict every still-unlabelled image with `version`; returns the accuracy."""
        indices = sorted(self.unlabelled)
        correct = 0
        for start in range(0, len(indices), 64):
            batch = indices[start:start + 64]
            instances = [{"b64": base64.b64encode(self.digits.pngs[i]).decode()} for i in batch]
            answer = self.client.post("/v1/predict", json={"instances": instances}).json()
            assert answer["version"] == version, answer
            correct += sum(p["label"] == str(self.digits.targets[i])
                           for p, i in zip(answer["predictions"], batch, strict=True))
        return correct / len(indices)

    def label_most_uncertain(self) -> list[int]:
        """The oracle: claim the 5 most uncertain tasks and label them with the truth."""
        index_of = {_sha256(self.digits.pngs[i]): i for i in self.unlabelled}
        _wait(lambda: self._stats()["pending"] >= PER_ROUND, 30, "predictions were not queued")
        tasks = self.client.get("/v1/labelling/tasks",
                                params={"limit": PER_ROUND, "labeller": "oracle"}).json()["tasks"]
        picked = [index_of[task["id"]] for task in tasks]
        for task, index in zip(tasks, picked, strict=True):
            response = self.client.post(f"/v1/labelling/tasks/{task['id']}/label",
                                        json={"label": str(self.digits.targets[index]),
                                              "labeller": "oracle"})
            response.raise_for_status()
        self.unlabelled -= set(picked)
        return picked

    def served_version(self) -> int:
        return int(self.client.get(f"/v2/models/{MODEL}").json()["versions"][-1])

    def _stats(self) -> dict[str, int]:
        return self.client.get("/v1/labelling/stats").json()


def halflabel_loop(digits: Digits, rounds: int, config: TrainConfig, work: Path,
                   redis_url: str) -> tuple[list[float], list[str]]:
    """The system's accuracies per round, and what the promotion gate decided each time."""
    repository = ModelRepository(work / "store")
    base = base_dataset(digits)
    started = time.perf_counter()
    first = export_and_publish(run_pipeline(base, config), repository, MODEL)
    console.print(f"trained {MODEL}:1 in {time.perf_counter() - started:.0f}s")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"HALFLABEL_MODEL_DIR": str(repository.root), "HALFLABEL_MODEL_NAME": MODEL,
           "HALFLABEL_QUEUE_PREFIX": prefix, "HALFLABEL_REDIS_URL": redis_url,
           "HALFLABEL_ENTROPY_THRESHOLD": "0", "HALFLABEL_POLL_INTERVAL_S": "0.5",
           "HALFLABEL_INTRA_OP_THREADS": "1"}
    client_redis = redis.Redis.from_url(redis_url)
    accuracies, decisions = [], []
    version = first.manifest.version
    try:
        with running_service(env, work / "service.log") as url, \
                httpx.Client(base_url=url, timeout=120) as client:
            loop = Loop(client, digits)
            for round_number in range(rounds):
                accuracies.append(loop.predict_and_score(version))
                console.print(f"round {round_number}: accuracy {accuracies[-1]:.1%} "
                              f"on {len(loop.unlabelled)} unlabelled ({MODEL}:{version})")
                if round_number == rounds - 1:
                    break
                picked = loop.label_most_uncertain()
                console.print(f"  oracle labelled {[int(digits.targets[i]) for i in picked]}")
                result = retrain(MODEL, repository, LabelStore(client_redis, prefix),
                                 work / "snapshots", config, base)
                decisions.append(
                    f"current {result.current.accuracy:.1%} vs candidate "
                    f"{result.candidate.accuracy:.1%}: "
                    + ("published" if result.published else "kept current"))
                console.print(f"  gate on {result.candidate.n} held-out digits: {decisions[-1]}")
                if result.published is not None:
                    version = result.published.manifest.version
                    _wait(lambda v=version: loop.served_version() == v, 60,
                          "the service did not pick up the new version")
    finally:
        keys = list(client_redis.scan_iter(f"{prefix}:*"))
        if keys:
            client_redis.delete(*keys)
    return accuracies, decisions


@app.command()
def main(
    rounds: Annotated[int, typer.Option(min=1, help="active-learning rounds")] = 5,
    orderings: Annotated[int, typer.Option(min=1, help="shufflings of the digits (seeds 0..)")
                         ] = 5,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 2,
    supervised_steps: Annotated[int, typer.Option(min=0)] = 100,
    pseudo_steps: Annotated[int, typer.Option(min=0)] = 300,
    refine_steps: Annotated[int, typer.Option(min=0)] = 0,
    spreading_rounds: Annotated[int, typer.Option(min=1)] = 2,
    spreading_space: Annotated[SpreadingSpace, typer.Option()] = "inputs",
    unreached_prior: Annotated[float, typer.Option(min=0)] = 0.01,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Print per-round accuracy of halflabel's loop next to scikit-learn's, per ordering and
    over all of them."""
    config = TrainConfig(
        supervised={"steps": supervised_steps}, pseudo={"steps": pseudo_steps},
        refine={"steps": refine_steps},
        spreading={"rounds": spreading_rounds, "first_space": spreading_space,
                   "unreached_prior": unreached_prior},
        threads=threads, seed=seed, progress=False)
    redis_url = os.environ.get("HALFLABEL_REDIS_URL", "redis://127.0.0.1:6379/0")
    ours, theirs = [], []
    for ordering in range(orderings):
        digits = Digits(ordering)
        theirs.append(sklearn_loop(digits, rounds))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="halflabel-al-") as scratch:
            accuracies, decisions = halflabel_loop(digits, rounds, config, Path(scratch),
                                                   redis_url)
        ours.append(accuracies)
        console.print(ordering_table(ordering, accuracies, theirs[-1]))
        for i, decision in enumerate(decisions):
            console.print(f"promotion gate after round {i}: {decision}")
        console.print(f"ordering {ordering}: halflabel loop wall time "
                      f"{time.perf_counter() - started:.0f}s")
    console.print(summary_table(np.array(ours), np.array(theirs)))
    console.print(f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch threads "
                  f"{threads}; config {config.model_dump(include=SHOWN_CONFIG)}")


def ordering_table(ordering: int, ours: list[float], theirs: list[float]) -> Table:
    table = Table(title=f"Ordering {ordering}: accuracy on the still-unlabelled digits "
                        f"({POOL_SIZE}-image pool, {INITIAL_LABELS} initial labels, "
                        f"{PER_ROUND} more per round)")
    for column in ("round", "labels", "halflabel (HTTP + Redis + retrain)",
                   "scikit-learn LabelSpreading", "difference"):
        table.add_column(column, justify="right")
    for i, (mine, sklearn) in enumerate(zip(ours, theirs, strict=True)):
        table.add_row(str(i), str(INITIAL_LABELS + PER_ROUND * i), f"{mine:.1%}",
                      f"{sklearn:.1%}", f"{(mine - sklearn) * 100:+.1f} pts")
    return table


def summary_table(ours: np.ndarray, theirs: np.ndarray) -> Table:
    """Per round (columns of the orderings x rounds arrays): mean and worst of each loop."""
    table = Table(title=f"Over {len(ours)} orderings")
    for column in ("round", "labels", "halflabel mean", "halflabel worst", "scikit-learn mean",
                   "scikit-learn worst", "orderings halflabel >= scikit-learn"):
        table.add_column(column, justify="right")
    for i in range(ours.shape[1]):
        table.add_row(str(i), str(INITIAL_LABELS + PER_ROUND * i), f"{ours[:, i].mean():.1%}",
                      f"{ours[:, i].min():.1%}", f"{theirs[:, i].mean():.1%}",
                      f"{theirs[:, i].min():.1%}",
                      f"{int(np.sum(ours[:, i] >= theirs[:, i]))} of {len(ours)}")
    return table


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.2)


if __name__ == "__main__":
    app()
