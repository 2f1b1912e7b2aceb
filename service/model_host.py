"""Which model version is served: load at start, poll the repository, swap atomically.

A new version is loaded and warmed up on a thread while the old one keeps serving; the swap
is one assignment, and the old version's batcher answers what it already queued before it
stops. A version that fails to load or verify (broken, tampered) is refused once and never
retried; the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass

from models.errors import HalflabelError, ModelNotFoundError
from models.manifest import Manifest
from models.repository import ModelRepository
from service import metrics
from service.batching import DynamicBatcher
from service.engine import OnnxModel
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """A loaded, warm model version and the batcher in front of it."""

    engine: OnnxModel
    batcher: DynamicBatcher

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest


class ModelHost:
    """Holds the served version of `settings.model_name` and replaces it with newer ones."""

    def __init__(self, settings: Settings, executor: Executor) -> None:
        self.settings = settings
        self.executor = executor
        self.repository = ModelRepository(settings.model_dir)
        self._current: ServedModel | None = None
        self._refused: set[int] = set()

    @property
    def current(self) -> ServedModel | None:
        """The served version, or None before the first load."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def load(self) -> None:
        """Load and warm up the pinned (or latest) version; raises HalflabelError on failure."""
        self._current = self._prepare(self.settings.model_version)
        self._announce(self._current)

    def serving(self, name: str, version: int | None = None) -> ServedModel:
        """The served model if it is `name` (at `version`, when given), else ModelNotFoundError."""
        current = self._current
        served = self.settings.model_name
        if current is None or name != served:
            raise ModelNotFoundError(f"model {name!r} is not served here; it serves {served!r}")
        if version is not None and version != current.manifest.version:
            raise ModelNotFoundError(
                f"version {version} of {name!r} is not served "
                f"(serving {current.manifest.version}); omit 'version' or pin it with "
                "HALFLABEL_MODEL_VERSION"
            )
        return current

    def start(self) -> None:
        """Start the served model's batcher on the running event loop."""
        if self._current is not None:
            self._current.batcher.start()

    async def close(self) -> None:
        """Answer queued inputs, then stop."""
        if self._current is not None:
            await self._current.batcher.close()

    async def poll(self) -> None:
        """Look for newer versions every poll interval, forever (not when a version is pinned)."""
        if self.settings.model_version is not None:
            return
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # e.g. the repository is unreadable for a while: keep polling
                log.exception("looking for a new version failed; will look again")

    async def refresh(self) -> None:
        """Swap to the latest version if it is newer than the served one and loads cleanly."""
        try:
            latest = await asyncio.to_thread(
                self.repository.latest_version, self.settings.model_name
            )
        except ModelNotFoundError:
            return
        current = self._current
        if latest in self._refused or (current and latest <= current.manifest.version):
            return
        try:
            new = await asyncio.to_thread(self._prepare, latest)
        except HalflabelError as exc:
            self._refused.add(latest)
            metrics.MODEL_LOAD_FAILURES.labels(self.settings.model_name).inc()
            log.error("refused version %d, still serving the old one: %s", latest, exc)
            return
        new.batcher.start()
        self._current = new
        self._announce(new)
        if current is not None:
            await current.batcher.close()

    def _prepare(self, version: int | None) -> ServedModel:
        artifact = self.repository.resolve(self.settings.model_name, version)
        settings = self.settings
        engine = OnnxModel(artifact, settings.device, settings.intra_op_threads)
        engine.warm_up(settings.max_batch_size)
        batcher = DynamicBatcher(
            engine.run,
            self.executor,
            model_name=engine.manifest.name,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
        )
        return ServedModel(engine, batcher)

    def _announce(self, served: ServedModel) -> None:
        manifest = served.manifest
        metrics.MODEL_VERSION.labels(manifest.name).set(manifest.version)
        log.info(
            "serving %s version %d on %s", manifest.name, manifest.version, served.engine.provider
        )
