"""One predict request end to end: decode → batch inference → predictions → labelling queue."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
from PIL import Image

from models.errors import HalflabelError
from models.manifest import InputSpec, Manifest
from models.preprocessing import decode_image, image_to_array
from models.queue import Guess, TaskRecord
from service import metrics
from service.batching import BatcherClosedError
from service.model_host import ModelHost, ServedModel
from service.queue_pusher import QueuePusher
from service.schemas import ClassProbability, Prediction, PredictResponse
from service.settings import Settings

T = TypeVar("T")
GUESSES_IN_TASK = 3
DEFAULT_TOP_K = 5


def decode_for_model(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, str]:
    """An image file → the model's input array (via models.preprocessing) and its MIME type."""
    image = decode_image(data, max_pixels)
    content_type = Image.MIME.get(image.format or "", "application/octet-stream")
    return image_to_array(image, spec), content_type


class RequestTimeoutError(HalflabelError):
    """A request took longer than the configured timeout."""


class Predictor:
    """Turns image files into predictions with the served model, queueing the uncertain ones."""

    def __init__(self, settings: Settings, host: ModelHost, pusher: QueuePusher) -> None:
        self.settings = settings
        self.host = host
        self.pusher = pusher

    async def predict(
        self, name: str, images: list[bytes], top_k: int | None = None, version: int | None = None
    ) -> PredictResponse:
        """Predict every image with `name` (at `version` when given), within the request timeout."""

        async def predict_with(served: ServedModel) -> PredictResponse:
            decoded = await asyncio.to_thread(self._decode, served, images)
            outputs = await served.batcher.infer([array for array, _ in decoded])
            predictions = [
                self._predict_one(served, image, content_type, probabilities, entropy, top_k)
                for image, (_, content_type), (probabilities, entropy) in zip(
                    images, decoded, outputs, strict=True
                )
            ]
            return PredictResponse(served.manifest.name, served.manifest.version, predictions)

        return await self.with_served(name, version, predict_with)

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

    def _decode(self, served: ServedModel, images: list[bytes]) -> list[tuple[np.ndarray, str]]:
        return [
            decode_for_model(data, served.manifest.input, self.settings.max_pixels)
            for data in images
        ]

    def _predict_one(
        self,
        served: ServedModel,
        image: bytes,
        content_type: str,
        probabilities: np.ndarray,
        entropy: float,
        top_k: int | None,
    ) -> Prediction:
        manifest = served.manifest
        ranked = np.argsort(probabilities)[::-1]
        normalized = min(max(entropy / math.log(len(manifest.classes)), 0.0), 1.0)
        metrics.PREDICTIONS.labels(manifest.name).inc()
        metrics.ENTROPY.observe(normalized)
        best = int(ranked[0])
        digest = hashlib.sha256(image).hexdigest()
        return Prediction(
            label=manifest.classes[best],
            class_index=best,
            confidence=float(probabilities[best]),
            probabilities=[
                ClassProbability(manifest.classes[i], float(probabilities[i]))
                for i in ranked[: top_k or DEFAULT_TOP_K]
            ],
            entropy=entropy,
            normalized_entropy=normalized,
            queued_for_labelling=self._queue_if_uncertain(
                manifest, image, digest, content_type, probabilities, ranked, entropy, normalized
            ),
            input_sha256=digest,
        )

    def _queue_if_uncertain(
        self,
        manifest: Manifest,
        image: bytes,
        digest: str,
        content_type: str,
        probabilities: np.ndarray,
        ranked: np.ndarray,
        entropy: float,
        normalized: float,
    ) -> bool:
        override = self.settings.entropy_threshold
        if normalized <= (manifest.entropy_threshold if override is None else override):
            return False
        metrics.LOW_CONFIDENCE.labels(manifest.name).inc()
        record = TaskRecord(
            id=digest,
            content_type=content_type,
            model_name=manifest.name,
            model_version=manifest.version,
            guesses=[
                Guess(label=manifest.classes[i], probability=float(probabilities[i]))
                for i in ranked[:GUESSES_IN_TASK]
            ],
            entropy=entropy,
            normalized_entropy=normalized,
        )
        return self.pusher.offer(record, image)
