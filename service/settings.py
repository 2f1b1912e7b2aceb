"""Service configuration: `HALFLABEL_*` environment variables, mirrored by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.preprocessing import DEFAULT_MAX_PIXELS
from models.queue import DEFAULT_PREFIX
from models.repository import default_root

SCOPES = ("predict", "label", "admin")
Scope = Literal["predict", "label", "admin"]


class Settings(BaseSettings):
    """Everything the service can be told; each field is `HALFLABEL_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_dir: Path = Field(default_factory=default_root, description="Model repository root")
    model_name: str = "digits"
    model_version: int | None = Field(default=None, ge=1, description="Pin a version; else latest")
    poll_interval_s: float = Field(default=5.0, gt=0, description="How often to look for versions")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime threads; 0 = cores")
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    max_queue_size: int = Field(default=1024, ge=1, description="Inputs held at once; more → 503")
    request_timeout_s: float = Field(default=30.0, gt=0)
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_prefix: str = DEFAULT_PREFIX
    entropy_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Override the manifest's queueing threshold"
    )
    push_buffer_size: int = Field(default=1000, ge=1, description="Queue pushes held in an outage")
    api_keys: Annotated[dict[str, frozenset[Scope]], NoDecode] = Field(
        default_factory=dict, description="'key1:predict,label;key2:admin'"
    )
    allow_open: bool = Field(default=False, description="Listen beyond loopback without API keys")
    max_body_bytes: int = Field(default=10_000_000, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_pixels_in_flight: int = Field(
        default=50_000_000, ge=1, description="Pixels decoded at once across requests; more → 503"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        return parse_api_keys(value) if isinstance(value, str) else value


def parse_api_keys(spec: str) -> dict[str, frozenset[str]]:
    """Parse `key1:predict,label;key2:admin` into {key: scopes}."""
    keys: dict[str, frozenset[str]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        key, _, scopes = entry.partition(":")
        names = frozenset(filter(None, (s.strip() for s in scopes.split(","))))
        unknown = names - set(SCOPES)
        if not key or not names or unknown:
            raise ValueError(
                f"bad API key entry {entry[:4]}...: write KEY:SCOPE[,SCOPE] with scopes from "
                f"{', '.join(SCOPES)}, entries separated by ';'"
            )
        keys[key.strip()] = names
    return keys
