"""halflabel-train's settings besides the recipe: `HALFLABEL_*` environment variables.

Flags are generated from these models by `models.settings_cli`, like those of `TrainConfig`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.queue import DEFAULT_PREFIX, DEFAULT_REDIS_URL
from models.repository import DEFAULT_ROOT


class RepositorySettings(BaseSettings):
    """Where the models are (every command)."""

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    model_dir: Path = Field(DEFAULT_ROOT, description="model repository root")


class RetrainSettings(RepositorySettings):
    """Where retrain's labels come from, and its promotion gate."""

    redis_url: str = Field(DEFAULT_REDIS_URL, description="the label store's Redis")
    queue_prefix: str = Field(DEFAULT_PREFIX, description="key prefix of the queue and labels")
    snapshot_dir: Path = Field(Path("data/feedback"),
                               description="root of the label snapshots, one folder per prefix")
    margin: float = Field(0.0, ge=-1, le=1, validation_alias="halflabel_retrain_margin",
                          description="publish if candidate >= current accuracy - margin")
    force: bool = Field(False, validation_alias="halflabel_retrain_force",
                        description="publish even if worse; retrain even without new labels")
