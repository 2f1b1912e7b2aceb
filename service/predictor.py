"""The one predict path, for /v1 image files and /v2 tensors alike: the route turns its body into
model inputs, then batch inference → metrics → labelling queue → the route's answer."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from PIL import Image

from models.manifest import InputSpec, Manifest
from models.preprocessing import decode_image, image_to_array
from models.queue import Guess, TaskRecord
from service import metrics
from service.admission import PixelBudget, image_pixels
from service.errors import BatcherClosedError, RequestTimeoutError
from service.model_host import ModelHost, ServedModel
from service.queue_pusher import QueuePusher
from service.schemas import ClassProbability, Prediction, PredictResponse
from service.settings import Settings

T = TypeVar("T")
GUESSES_IN_TASK = 3
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class ImageFile:
    """An image file as the labelling queue stores it; its sha256 is the task id."""

    data: bytes
    content_type: str
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())


class ModelInput:
    """One input as the model takes it, and the image file that stands for it in the labelling
    queue: the file that was sent, or one rendered from a tensor on first use."""

    def __init__(self, array: np.ndarray, file: ImageFile | Callable[[], ImageFile]) -> None:
        self.array = array
        self._file = file

    @property
    def rendered(self) -> bool:
        return isinstance(self._file, ImageFile)

    @property
    def file(self) -> ImageFile:
        if not isinstance(self._file, ImageFile):
            self._file = self._file()
        return self._file


@dataclass
class Scored:
    """What the model says about one input, and whether it went to the labelling queue."""

    input: ModelInput
    probabilities: np.ndarray
    entropy: float
    normalized_entropy: float
    ranked: np.ndarray  # class indices, most probable first
    queued: bool = False


@dataclass(frozen=True)
class Inference:
    """The model version that answered and its answer for each input, in order."""

    manifest: Manifest
    scored: list[Scored]


Prepare = Callable[[ServedModel], list[ModelInput]]
"""A route's body → model inputs for the served model; runs on a thread (it decodes)."""


def decode_for_model(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, str]:
    """An image file → the model's input array (via models.preprocessing) and its MIME type."""
    image = decode_image(data, max_pixels)
    content_type = Image.MIME.get(image.format or "", "application/octet-stream")
    return image_to_array(image, spec), content_type


class Predictor:
    """Runs model inputs through the served model, counting and queueing the uncertain ones."""

    def __init__(self, settings: Settings, host: ModelHost, pusher: QueuePusher) -> None:
        self.settings = settings
        self.host = host
        self.pusher = pusher
        self.pixels = PixelBudget(settings.max_pixels_in_flight)

    async def predict(
        self, name: str, images: list[bytes], top_k: int | None = None, version: int | None = None
    ) -> PredictResponse:
        """Predict every image file with `name` (at `version` when given): the /v1 answer."""

        def decode(served: ServedModel) -> list[ModelInput]:
            inputs = []
            with self.pixels.reserve(sum(map(image_pixels, images))):
                for data in images:
                    array, content_type = decode_for_model(
                        data, served.manifest.input, self.settings.max_pixels
                    )
                    inputs.append(ModelInput(array, ImageFile(data, content_type)))
            return inputs

        inference = await self.infer(name, version, decode)
        manifest = inference.manifest
        predictions = [_prediction(manifest, scored, top_k) for scored in inference.scored]
        return PredictResponse(manifest.name, manifest.version, predictions)

    async def infer(self, name: str, version: int | None, prepare: Prepare) -> Inference:
        """Run what `prepare` makes of the body through `name`, within the request timeout."""

        async def infer_with(served: ServedModel) -> Inference:
            manifest = served.manifest
            inputs = await asyncio.to_thread(prepare, served)
            rows = await served.batcher.infer([model_input.array for model_input in inputs])
            scored = [
                _score(manifest, model_input, probabilities, entropy)
                for model_input, (probabilities, entropy) in zip(inputs, rows, strict=True)
            ]
            await self._queue_uncertain(manifest, scored)
            return Inference(manifest, scored)

        return await self.with_served(name, version, infer_with)

    def admit(self, name: str, version: int | None) -> None:
        """404 or 503 before a body is read: the model is not served, or its queue is full."""
        self.host.serving(name, version).batcher.check_room(1)

    async def with_served(
        self, name: str, version: int | None, work: Callable[[ServedModel], Awaitable[T]]
    ) -> T:
        """Run `work` on the served model within the request timeout.

        When a new version is swapped in while `work` waits, it runs again on the new one.
        """
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                try:
                    return await work(self.host.serving(name, version))
                except BatcherClosedError:
                    return await work(self.host.serving(name, version))
        except TimeoutError:
            raise RequestTimeoutError(
                f"no answer within {self.settings.request_timeout_s:g}s; retry later "
                "or raise HALFLABEL_REQUEST_TIMEOUT_S"
            ) from None

    async def _queue_uncertain(self, manifest: Manifest, scored: list[Scored]) -> None:
        override = self.settings.entropy_threshold
        threshold = manifest.entropy_threshold if override is None else override
        uncertain = [one for one in scored if one.normalized_entropy > threshold]
        unrendered = [one.input for one in uncertain if not one.input.rendered]
        if unrendered:  # encoding a tensor as PNG is CPU work: off the event loop
            await asyncio.to_thread(lambda: [model_input.file for model_input in unrendered])
        for one in uncertain:
            metrics.LOW_CONFIDENCE.labels(manifest.name).inc()
            record = TaskRecord(
                id=one.input.file.sha256,
                content_type=one.input.file.content_type,
                model_name=manifest.name,
                model_version=manifest.version,
                guesses=[
                    Guess(label=manifest.classes[i], probability=float(one.probabilities[i]))
                    for i in one.ranked[:GUESSES_IN_TASK]
                ],
                entropy=one.entropy,
                normalized_entropy=one.normalized_entropy,
            )
            one.queued = self.pusher.offer(record, one.input.file.data)


def _score(
    manifest: Manifest, model_input: ModelInput, probabilities: np.ndarray, entropy: float
) -> Scored:
    normalized = min(max(entropy / math.log(len(manifest.classes)), 0.0), 1.0)
    metrics.PREDICTIONS.labels(manifest.name).inc()
    metrics.ENTROPY.labels(manifest.name).observe(normalized)
    ranked = np.argsort(probabilities)[::-1]
    return Scored(model_input, probabilities, entropy, normalized, ranked)


def _prediction(manifest: Manifest, scored: Scored, top_k: int | None) -> Prediction:
    best = int(scored.ranked[0])
    return Prediction(
        label=manifest.classes[best],
        class_index=best,
        confidence=float(scored.probabilities[best]),
        probabilities=[
            ClassProbability(manifest.classes[i], float(scored.probabilities[i]))
            for i in scored.ranked[: top_k or DEFAULT_TOP_K]
        ],
        entropy=scored.entropy,
        normalized_entropy=scored.normalized_entropy,
        queued_for_labelling=scored.queued,
        input_sha256=scored.input.file.sha256,
    )
