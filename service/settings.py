"""Service configuration: one model, read from `HALFLABEL_*` environment variables and, through
`service.cli`, from `halflabel-serve` flags generated from the same fields."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.preprocessing import DEFAULT_MAX_PIXELS
from models.queue import DEFAULT_LEASE_SECONDS, DEFAULT_PREFIX, DEFAULT_REDIS_URL
from models.repository import DEFAULT_ROOT

SCOPES = ("predict", "label", "admin")
Scope = Literal["predict", "label", "admin"]
DEFAULT_SPOOL_DIR = Path(tempfile.gettempdir()) / "halflabel-spool"


class Settings(BaseSettings):
    """Serve a model over HTTP. Each flag is also the environment variable shown with it."""

    # Every field becomes `HALFLABEL_<FIELD>` and `--<field-with-dashes>` (see service.cli); its
    # description is the flag's help, so each field needs one.

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_", protected_namespaces=())

    host: str = Field(default="127.0.0.1", description="Address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on (0: any free)")
    workers: int = Field(
        default=1, ge=1,
        description="Processes serving the port, each with its own model session, batcher and "
        "connection limits (docs/deploy.md: several for a GPU, one per pod on CPU)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe log messages shown"
    )
    model_dir: Path = Field(default=DEFAULT_ROOT, description="Model repository root")
    model_name: str = Field(default="digits", description="Model to serve")
    model_version: int | None = Field(
        default=None, ge=1, description="Pin a version (disables polling); else the latest"
    )
    poll_interval_s: float = Field(
        default=5.0, gt=0, description="Seconds between looks for new versions"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where ONNX Runtime runs; auto = CUDA if a GPU is present"
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime threads per batch; 0 = all cores"
    )
    max_batch_size: int = Field(default=32, ge=1, description="Largest batch the batcher forms")
    max_queue_delay_ms: float = Field(
        default=2.0, ge=0, description="Longest an input waits for others to join its batch"
    )
    max_queue_size: int = Field(
        default=1024, ge=1, description="Inputs held at once; more: 503, more in one request: 413"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="Per-request limit (504)")
    redis_url: str = Field(
        default=DEFAULT_REDIS_URL, description="Redis of the labelling queue"
    )
    queue_prefix: str = Field(
        default=DEFAULT_PREFIX, description="Prefix of the queue's Redis keys"
    )
    entropy_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Override the manifest's queueing threshold"
    )
    push_buffer_size: int = Field(
        default=1000, ge=1, description="Inputs for the queue held in the spool while Redis is away"
    )
    spool_dir: Path = Field(
        default=DEFAULT_SPOOL_DIR,
        description="Where inputs for the queue wait on disk until Redis has them (one service "
        "per directory, a subdirectory per worker)",
    )
    spool_max_bytes: int = Field(
        default=512 * 2**20, ge=1, description="Disk the spool may use; beyond it, not queued"
    )
    api_keys: Annotated[dict[str, frozenset[Scope]], NoDecode] = Field(
        default_factory=dict,
        description="API keys and their scopes: 'KEY:SCOPE[,SCOPE];KEY2:SCOPE' (none: open)",
    )
    allow_open: bool = Field(default=False, description="Listen beyond loopback without API keys")
    max_body_bytes: int = Field(default=10_000_000, ge=1, description="Request body limit (413)")
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="Pixels per image (decompression bombs)"
    )
    # Connection-level limits, enforced by service.server before a request reaches the app.
    max_header_bytes: int = Field(
        default=32_768, ge=1024, description="Request line plus headers, in bytes (431)"
    )
    max_header_count: int = Field(default=100, ge=1, description="Headers per request (431)")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Time a client has to send a request's headers (408)"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Time a client has to send a body once its headers are in"
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="Idle seconds before a keep-alive connection is closed"
    )
    max_connections: int = Field(
        default=1000, ge=1, description="Open connections; more are answered 503 and closed"
    )
    max_requests_in_flight: int = Field(
        default=256, ge=1,
        description="Requests being answered at once; an inference request beyond them is "
        "answered 503 from its headers, before its body is read",
    )
    backlog: int = Field(default=2048, ge=1, description="Connections waiting to be accepted")
    shutdown_timeout_s: int = Field(
        default=20, ge=1, description="On SIGTERM, time left to requests in flight"
    )
    label_lease_seconds: float = Field(
        default=DEFAULT_LEASE_SECONDS, gt=0, description="How long a claimed labelling task is held"
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port serving /metrics without a key (for Prometheus); 0: none, /metrics "
        "stays on the main port behind the admin scope",
    )
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
